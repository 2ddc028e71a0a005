"""Run exported graphs in ONNX Runtime: explicit providers, adapter files, an adapter cache.

* :func:`check_build` (run when a session opens): the provider set ONNX Runtime reports must fit
  the installed build(s); several builds over one folder (onnxruntime-genai brings the CPU
  ``onnxruntime`` over onnxruntime-gpu) warn with the pip commands that fix it.
* :func:`open_session` takes providers by short name (``"tensorrt"``, ``"cuda"``, ``"cpu"``) in
  order of preference, drops (with a :class:`ProviderFallbackWarning`) those this onnxruntime
  build lacks, always keeps CPU last, and reports which provider actually runs the nodes
  (ORT's graph-assignment record), warning when the preferred one got none.
* :meth:`LoraSession.run` with a :class:`LoadedAdapter` uses ``RunOptions.add_active_adapter``
  with a plain ``run``: ORT ignores active adapters under IOBinding, so that path never binds.
* :class:`AdapterCache` keeps many adapters resident in host memory as OrtValues and binds the
  active one's tensors as ordinary inputs of an IOBinding. A switch re-binds host OrtValues (on
  CPU: no copy) or copies them host-to-device into device buffers (``update_inplace`` when the
  shape is unchanged, as with a fixed-max-rank graph); the session is never rebuilt.
* :meth:`LoraSession.run_batched` checks ``adapter_index`` against the bank size first, and the
  token ids of Embedding LoRA sites against [0, V) (read from the graph's
  ``lora_ref.embedding_ids`` metadata and traced back to the graph input that feeds them
  through value-preserving ops; ids computed in the graph are not checked, with a warning).
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from lora_ref.adapter import Adapter
from lora_ref.inputs import require_regular_file

from .adapter_files import LoadedAdapter, adapter_tensors, fit_names, load_onnx_adapter
from .batched import EMBEDDING_IDS_KEY, INDEX_INPUT
from .errors import AdapterIndexError, ProviderFallbackWarning, RuntimeBuildWarning, TokenIdError, UncheckedIdsWarning
from .graphio import check_readable
from .slots import Slot, check_tensors, slots_from_model

PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}

#: ONNX Runtime builds that install the one ``onnxruntime`` package folder, and a provider each build has.
ORT_BUILDS = {"onnxruntime-gpu": "CUDAExecutionProvider", "onnxruntime-directml": "DmlExecutionProvider",
              "onnxruntime-openvino": "OpenVINOExecutionProvider", "onnxruntime-qnn": "QNNExecutionProvider",
              "onnxruntime": "CPUExecutionProvider"}


def installed_builds() -> dict[str, str]:
    """Installed ONNX Runtime builds (distribution name -> version), e.g. ``{"onnxruntime-gpu": "1.31.1"}``."""
    from importlib import metadata

    found = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name in ORT_BUILDS:
            found[name] = dist.version
    return found


def build_mismatch(builds: Mapping[str, str], available: Sequence[str]) -> str | None:
    """Why the providers ORT reports (``available``) do not fit the installed ``builds``, with the fix; or None.

    Several builds share one ``onnxruntime`` folder, so the last one installed wins silently:
    installing onnxruntime-genai (which needs the CPU ``onnxruntime``) over onnxruntime-gpu removes
    the CUDA provider while ``pip check`` stays quiet.
    """
    if len(builds) > 1:
        lost = sorted(b for b in builds if ORT_BUILDS[b] not in available)
        listed = ", ".join(f"{name}=={version}" for name, version in sorted(builds.items()))
        keep = next((b for b in builds if b != "onnxruntime"), "onnxruntime")
        return (f"several ONNX Runtime builds are installed over one folder ({listed}); "
                f"{'providers of ' + ', '.join(lost) + ' are missing' if lost else 'whichever was installed last is active'}. "
                f"Fix: pip uninstall -y {' '.join(sorted(builds))} && pip install {keep}"
                + (" (onnxruntime-genai needs the CPU onnxruntime: give it its own venv, or use onnxruntime-genai-cuda with onnxruntime-gpu)"
                   if "onnxruntime" in builds else ""))
    for name in builds:
        if ORT_BUILDS[name] not in available:
            return (f"{name} is installed but ONNX Runtime reports no {ORT_BUILDS[name]} (available: {list(available)}): "
                    f"its files were overwritten. Fix: pip install --force-reinstall --no-deps {name}")
    return None


@functools.cache
def check_build() -> str | None:
    """Warn once (RuntimeBuildWarning) when the installed ONNX Runtime build and its providers disagree; return the message."""
    message = build_mismatch(installed_builds(), ort.get_available_providers())
    if message:
        warnings.warn(message, RuntimeBuildWarning, stacklevel=3)
    return message
_DEVICE = {"TensorrtExecutionProvider": "cuda", "CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}


def resolve_providers(preferred: Sequence[str]) -> list[str]:
    """Full ORT provider names for short or full ``preferred`` names, unavailable ones dropped (warned), CPU last."""
    available = ort.get_available_providers()
    chosen = []
    for name in preferred:
        full = PROVIDERS.get(name.lower(), name)
        if full not in available:
            warnings.warn(f"execution provider {full} is not available in this onnxruntime build "
                          f"(available: {available}); falling back", ProviderFallbackWarning, stacklevel=3)
        elif full not in chosen:
            chosen.append(full)
    if PROVIDERS["cpu"] not in chosen:
        chosen.append(PROVIDERS["cpu"])
    return chosen


class LoraSession:
    """An InferenceSession over an exported graph, with its LoRA slots and provider report.

    ``provider_options`` maps a provider (short or full name) to its ORT options, e.g.
    ``{"cuda": {"use_tf32": "0"}}``.
    """

    def __init__(self, model: str | os.PathLike[str] | onnx.ModelProto, providers: Sequence[str] = ("cpu",), *,
                 options: ort.SessionOptions | None = None, provider_options: Mapping[str, dict] | None = None) -> None:
        proto = model if isinstance(model, onnx.ModelProto) else header_only(Path(model))
        check_readable(proto, where=str(model) if not isinstance(model, onnx.ModelProto) else "model")
        self.slots: dict[str, Slot] = slots_from_model(proto)
        self.bank_sizes = {t.name: int(t.dims[0]) for t in proto.graph.initializer if t.name.endswith(".bank")}
        self.token_ids = _token_id_inputs(proto)
        self.requested = list(providers)
        check_build()
        chosen = resolve_providers(providers)
        options = options or ort.SessionOptions()
        options.log_severity_level = max(options.log_severity_level, 3)  # ORT warns about overridable initializers
        _set_config(options, "session.record_ep_graph_assignment_info", "1")
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        by_full_name = {PROVIDERS.get(k.lower(), k): dict(v) for k, v in (provider_options or {}).items()}
        kwargs = {"provider_options": [by_full_name.get(name, {}) for name in chosen]} if by_full_name else {}
        self.session = ort.InferenceSession(source, options, providers=chosen, **kwargs)
        self.node_counts = Counter()
        for subgraph in self.session.get_provider_graph_assignment_info():
            self.node_counts[subgraph.ep_name] += len(subgraph.get_nodes())
        preferred = PROVIDERS.get(self.requested[0].lower(), self.requested[0]) if self.requested else PROVIDERS["cpu"]
        if self.node_counts.get(preferred, 0) == 0:
            warnings.warn(f"{preferred} runs none of the graph's nodes; it runs on {dict(self.node_counts)}",
                          ProviderFallbackWarning, stacklevel=2)

    @property
    def provider(self) -> str:
        """The provider that runs the most nodes of this graph."""
        return self.node_counts.most_common(1)[0][0] if self.node_counts else self.session.get_providers()[0]

    @property
    def device(self) -> str:
        return _DEVICE.get(self.provider, "cpu")

    def describe(self) -> str:
        """e.g. ``CPUExecutionProvider (all 57 nodes)`` or ``CUDAExecutionProvider (50), CPUExecutionProvider (7)``."""
        if len(self.node_counts) == 1:
            (name, count), = self.node_counts.items()
            return f"{name} (all {count} nodes)"
        return ", ".join(f"{name} ({count})" for name, count in self.node_counts.most_common())

    def load_adapter(self, path: str | os.PathLike[str]) -> LoadedAdapter:
        """An ``.onnx_adapter`` file checked against this graph's LoRA inputs."""
        return load_onnx_adapter(path, self.slots)

    def run(self, feeds: Mapping[str, np.ndarray], adapter: LoadedAdapter | None = None, outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        """Plain ``run``; with ``adapter`` through ``RunOptions.add_active_adapter`` (no IOBinding)."""
        options = ort.RunOptions()
        if adapter is not None:
            options.add_active_adapter(adapter.lora)
        return self.session.run(list(outputs) if outputs else None, dict(feeds), options)

    def run_batched(self, feeds: Mapping[str, np.ndarray], adapter_index: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        """Run a batched graph with ``adapter_index`` checked against the bank size (fed banks included)."""
        raw = np.asarray(adapter_index)
        if raw.dtype.kind not in "iu":
            raise AdapterIndexError(f"{INDEX_INPUT} must hold integers, got {raw.dtype}")
        index = raw.astype(np.int64)
        if index.ndim != 1:
            raise AdapterIndexError(f"{INDEX_INPUT} must be 1-D [batch], got shape {index.shape}")
        sizes = {name: int(np.shape(feeds[name])[0]) if name in feeds else n for name, n in self.bank_sizes.items()}
        if not sizes:
            raise AdapterIndexError("this graph has no adapter banks (not a batched graph)")
        n = min(sizes.values())
        bad = index[(index < -1) | (index >= n)]
        if bad.size:
            raise AdapterIndexError(f"{INDEX_INPUT} holds {bad[:5].tolist()}: valid values are -1 (base) and 0..{n - 1}")
        for name, vocab in self.token_ids.items():
            ids = np.asarray(feeds[name]) if name in feeds else None
            if ids is None or ids.dtype.kind not in "iu":
                continue  # ORT reports a missing or mistyped input itself
            bad = ids[(ids < 0) | (ids >= vocab)]
            if bad.size:
                raise TokenIdError(f"{name} holds token ids {bad[:5].tolist()} outside [0, {vocab}): in the batched "
                                   "graph's embedding bank they would read another adapter's rows")
        return self.session.run(None, {**feeds, INDEX_INPUT: index})


#: Ops that pass their input's values through unchanged (a token id keeps its value).
_VALUE_PRESERVING = {"Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}


def _token_id_inputs(proto: onnx.ModelProto) -> dict[str, int]:
    """Graph input -> V for each Embedding LoRA site of a batched graph (from ``EMBEDDING_IDS_KEY`` metadata).

    An ids tensor is traced back through value-preserving ops to a graph input; one that is
    computed otherwise cannot be checked before a run (UncheckedIdsWarning).
    """
    entry = next((prop.value for prop in proto.metadata_props if prop.key == EMBEDDING_IDS_KEY), None)
    if entry is None:
        return {}
    producer = {out: node for node in proto.graph.node for out in node.output}
    inputs = {info.name for info in proto.graph.input}
    checked: dict[str, int] = {}
    for name, vocab in json.loads(entry).items():
        source = name
        while source not in inputs and source in producer and producer[source].op_type in _VALUE_PRESERVING:
            source = producer[source].input[0]
        if source in inputs:
            checked[source] = min(int(vocab), checked.get(source, int(vocab)))
        else:
            warnings.warn(f"the embedding ids {name!r} are computed in the graph; run_batched cannot check them against "
                          f"[0, {vocab})", UncheckedIdsWarning, stacklevel=3)
    return checked


def _set_config(options: ort.SessionOptions, key: str, value: str) -> None:
    """Add a session config entry unless it is already set (ORT warns on overwrites)."""
    try:
        if options.get_session_config_entry(key) == value:
            return
    except RuntimeError:  # not set yet
        pass
    options.add_session_config_entry(key, value)


def header_only(path: Path) -> onnx.ModelProto:
    """The model without external tensor data (enough for IR version, inputs and dims)."""
    from lora_ref.errors import FileFormatError

    require_regular_file(path, "ONNX file")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001
        raise FileFormatError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None


def open_session(model: str | os.PathLike[str] | onnx.ModelProto, providers: Sequence[str] = ("cpu",), **kwargs) -> LoraSession:
    """A :class:`LoraSession` (see module docstring)."""
    return LoraSession(model, providers, **kwargs)


class AdapterCache:
    """Adapters resident in host memory as OrtValues; the active one bound with IOBinding.

    ``add`` accepts a PEFT :class:`Adapter`, a loaded ``.onnx_adapter`` or a name -> array
    mapping; every entry is checked against the graph's LoRA inputs. Modules an adapter does
    not cover are bound to the graph's defaults (rank 0, or zeros at a static rank).
    """

    def __init__(self, session: LoraSession) -> None:
        self.session = session
        self.device = session.device
        self._host: dict[str, dict[str, tuple[np.ndarray, ort.OrtValue]]] = {}
        self._defaults = {name: self._host_value(slot.default()) for name, slot in session.slots.items()}
        self._device_buffers: dict[str, ort.OrtValue] = {}
        self.binding = session.session.io_binding()
        self.active: str | None = None
        self.activate(None)

    @staticmethod
    def _host_value(array: np.ndarray) -> tuple[np.ndarray, ort.OrtValue]:
        array = np.ascontiguousarray(array)
        return array, ort.OrtValue.ortvalue_from_numpy(array)  # keep the array: the OrtValue views it

    def add(self, name: str, adapter: Adapter | LoadedAdapter | Mapping[str, np.ndarray]) -> None:
        """Keep ``adapter`` in host memory under ``name``."""
        if isinstance(adapter, Adapter):
            tensors = adapter_tensors(adapter, self.session.slots)
        else:
            tensors = fit_names(adapter.tensors if isinstance(adapter, LoadedAdapter) else adapter, self.session.slots)
            check_tensors({k: (np.shape(v), np.asarray(v).dtype) for k, v in tensors.items()}, self.session.slots, f"adapter {name!r}")
        self._host[name] = {k: self._host_value(v) for k, v in tensors.items()}

    def __contains__(self, name: object) -> bool:
        return name in self._host

    def __len__(self) -> int:
        return len(self._host)

    def activate(self, name: str | None) -> None:
        """Bind adapter ``name`` (None: the base model) to the session's LoRA inputs."""
        if name is not None and name not in self._host:
            from lora_ref.errors import ConfigError

            raise ConfigError(f"adapter {name!r} is not in the cache (have {sorted(self._host)})")
        chosen = self._host.get(name, {}) if name is not None else {}
        for slot in self.session.slots:
            array, host = chosen.get(slot, self._defaults[slot])
            self.binding.bind_ortvalue_input(slot, self._to_device(slot, array, host))
        self.active = name

    def _to_device(self, slot: str, array: np.ndarray, host: ort.OrtValue) -> ort.OrtValue:
        if self.device == "cpu":
            return host
        buffer = self._device_buffers.get(slot)
        if buffer is not None and tuple(buffer.shape()) == array.shape:
            buffer.update_inplace(array)  # host-to-device copy into the bound buffer
        else:
            buffer = ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)
            self._device_buffers[slot] = buffer
        return buffer

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run with the active adapter; ``feeds`` are the graph's ordinary inputs."""
        for key, value in feeds.items():
            self.binding.bind_cpu_input(key, np.ascontiguousarray(value))
        # Unallocated outputs each run: ORT would otherwise reuse the last run's buffers and
        # refuse a run whose output shape differs (another batch or sequence length).
        self.binding.clear_binding_outputs()
        for output in self.session.session.get_outputs():
            self.binding.bind_output(output.name, self.device)
        self.session.session.run_with_iobinding(self.binding)
        return self.binding.copy_outputs_to_cpu()
