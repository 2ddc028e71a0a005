"""A small gRPC client for a lora-ref batched model on Triton: token ids + adapter name -> logits.

    from lora_ref.export.triton_client import LoraTritonClient
    client = LoraTritonClient("localhost:8001", "llama")
    logits = client.infer([1, 5, 9], "adapter_a")          # [3, vocab]; adapter=None: base model

The client reads the model's config once (``parameters["lora_ref.adapters"]``: {version:
{name: index}}, the padding mode and granule) and pins every request to the newest version
it knows, so a name always means the bank row it had in that version. An unknown name, or an
index outside [-1, N), is refused here (:class:`AdapterIndexError` naming the index and N)
before any request; the server's own refusal (the python stand-in answers the same way) comes
back as :class:`TritonRequestError`. A version that went away (a new one replaced it) makes the
client re-read the config and retry once when the adapter was named (a bare index is not
retried: it may name another adapter in the new version).

Padding (SPEC E.6): with ``padding == "right"`` the ids are right-padded with token 0 to the
next multiple of ``pad_multiple`` (plus ``attention_mask`` zeros where the graph has that
input), so requests of different lengths share a shape and batch together; the logits of the
real positions are returned. With ``"none"`` the ids go as they are.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from lora_ref.errors import ConfigError, LoraRefError

from .batched import INDEX_INPUT
from .errors import AdapterIndexError
from .triton import ADAPTERS_PARAMETER, MASK_INPUT, PAD_MULTIPLE_PARAMETER, PADDING_PARAMETER


class TritonRequestError(LoraRefError):
    """The server refused or failed a request; the message is the server's."""


class LoraTritonClient:
    """One gRPC connection to model ``model`` (module docstring). Not thread-safe: one per thread."""

    def __init__(self, url: str, model: str, *, timeout_s: float = 30.0) -> None:
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.model = model
        self.timeout_s = timeout_s
        self.refresh()

    def refresh(self) -> None:
        """Re-read the model's config: adapter maps, padding, inputs."""
        config = self.client.get_model_config(self.model, as_json=True)["config"]
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        maps = {int(v): m for v, m in json.loads(parameters.get(ADAPTERS_PARAMETER, "{}")).items()}
        if not maps:
            raise ConfigError(f"model {self.model!r} has no {ADAPTERS_PARAMETER!r} parameter: not written by lora-ref export --triton-repo")
        ready = [int(v) for v in maps if self.client.is_model_ready(self.model, str(v))]
        self.version = max(ready or maps)
        self.adapters: dict[str, int] = maps[self.version]
        self.padding = parameters.get(PADDING_PARAMETER, "none")
        self.pad_multiple = int(parameters.get(PAD_MULTIPLE_PARAMETER, "1"))
        self.inputs = {i["name"]: i for i in config["input"]}
        self.ids_input = next(n for n, i in self.inputs.items() if n not in (INDEX_INPUT, MASK_INPUT) and "INT" in i["data_type"])
        self.output = config["output"][0]["name"]

    def index_of(self, adapter: str | int | None) -> int:
        """The bank row of ``adapter`` (a name, an index, or None for the base model), checked against [-1, N)."""
        n = len(self.adapters)
        if adapter is None:
            return -1
        if isinstance(adapter, str):
            if adapter not in self.adapters:
                raise AdapterIndexError(f"model {self.model!r} version {self.version} has no adapter {adapter!r} "
                                        f"(has {sorted(self.adapters)})")
            return self.adapters[adapter]
        index = int(adapter)
        if not -1 <= index < n:
            raise AdapterIndexError(f"adapter_index {index} is outside [-1, {n}): {n} adapters, -1 = base model")
        return index

    def infer(self, ids: Sequence[int] | np.ndarray, adapter: str | int | None = None, *, check: bool = True) -> np.ndarray:
        """Logits [len(ids), vocab] for one sequence with ``adapter``; ``check=False`` sends an index unchecked (tests).

        When the pinned version went away, a name (or None) is looked up again in the new
        version's map and the request retried once; a bare index is not (it may name another
        adapter there): that is a :class:`TritonRequestError`.
        """
        ids = np.asarray(ids, np.int64).reshape(-1)
        for attempt in range(2):
            index = self.index_of(adapter) if check else int(adapter)
            try:
                return self._send(ids, index)
            except TritonRequestError as exc:
                message = str(exc).lower()
                if attempt == 1 or not ("unavailable" in message or "version" in message):
                    raise
                version = self.version
                self.refresh()
                if not (adapter is None or isinstance(adapter, str)):
                    raise TritonRequestError(f"model {self.model!r} version {version} went away (now {self.version}); "
                                             f"adapter_index {adapter} may name another adapter there: ask by name") from None
        raise AssertionError("unreachable")

    def _send(self, ids: np.ndarray, index: int) -> np.ndarray:
        """One request to the pinned version: ids right-padded per ``padding``; the real positions' logits."""
        length = len(ids)
        width = -(-length // self.pad_multiple) * self.pad_multiple if self.padding == "right" else length
        row = np.zeros((1, width), np.int64)
        row[0, :length] = ids
        tensors = {self.ids_input: row, INDEX_INPUT: np.array([[index]], np.int64)}
        if MASK_INPUT in self.inputs:
            tensors[MASK_INPUT] = (np.arange(width) < length).astype(np.int64)[None, :]
        inputs = []
        for name, value in tensors.items():
            item = self._grpc.InferInput(name, list(value.shape), self.inputs[name]["data_type"].removeprefix("TYPE_"))
            item.set_data_from_numpy(value.astype(np.int32) if "INT32" in self.inputs[name]["data_type"] else value)
            inputs.append(item)
        try:
            result = self.client.infer(self.model, inputs, model_version=str(self.version),
                                       outputs=[self._grpc.InferRequestedOutput(self.output)], client_timeout=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - tritonclient raises InferenceServerException
            raise TritonRequestError(f"model {self.model!r} v{self.version}: {exc}") from None
        return result.as_numpy(self.output)[0, :length]
