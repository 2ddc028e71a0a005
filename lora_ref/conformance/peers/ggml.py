"""ggml (llama.cpp's tensor library) as a conformance implementation, through ctypes, no compiler:
``--impl lora_ref.conformance.peers.ggml:factory --compute ggml`` (``--layout canonical``: the
exact scale, as ``lora-ref to-gguf`` makes llama.cpp read it; ``--layout peft``: llama.cpp's own
rule s = alpha / r, alpha = 0 meaning 1, rsLoRA ignored, SPEC G).

The libraries are the ``libggml-base`` and ``libggml-cpu`` that llama-cpp-python ships (in
``llama_cpp/lib``); ``LORA_REF_GGML_LIB`` names that directory where llama-cpp-python lives in
another environment. Each case builds the graphs llama.cpp builds, one thread, float32 results
rounded to t in NumPy:

    linear.forward     y = ggml_add(ggml_mul_mat(W, x), ggml_scale(ggml_mul_mat(B, ggml_mul_mat(A, x)), s)) (+ b)
    embedding.forward  y = ggml_get_rows(W, ids) + ggml_scale(ggml_mul_mat(B, ggml_get_rows(Aᵀ, ids)), s)
    linear.merge       W' = W + ggml_scale(ggml_mul_mat(Aᵀ, B), s), everything in float32 (llama-export-lora)
    embedding.merge    W' = W + ggml_scale(ggml_mul_mat(B, Aᵀ), s)

(``ggml_mul_mat(a, b)`` with a [M, K] and b [N, K] in NumPy terms is b aᵀ [N, M]; transposes and
the fan_in_fan_out layout are exact NumPy copies.) Unsupported (skipped, llama.cpp has none of
them): dropout masks, lora_bias, safe merges, every other operation. Shapes and token ids are
checked here before ggml sees them (a ggml assertion aborts the process): a mismatch is a refusal.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ...dtypes import bfloat16, float16, float32, round_to
from ...errors import ConfigError

Arrays = dict[str, np.ndarray]
#: enum ggml_type values (ggml.h) of the storage dtypes, and of the index type.
GGML_TYPES = {np.dtype(float32): 0, np.dtype(float16): 1, np.dtype(bfloat16): 30}
GGML_TYPE_I32 = 26
_ENV = "LORA_REF_GGML_LIB"


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def library_dir() -> Path:
    """``$LORA_REF_GGML_LIB``, else llama-cpp-python's ``llama_cpp/lib`` (found without importing it)."""
    if os.environ.get(_ENV):
        return Path(os.environ[_ENV])
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise ConfigError(f"ggml peer: llama-cpp-python is not installed; pip install llama-cpp-python, "
                          f"or set {_ENV} to a directory holding libggml-base.so and libggml-cpu.so")
    return Path(spec.origin).parent / "lib"


def _load(directory: Path) -> tuple[ctypes.CDLL, ctypes.CDLL]:
    try:
        base = ctypes.CDLL(str(directory / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
        cpu = ctypes.CDLL(str(directory / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise ConfigError(f"ggml peer: cannot load libggml-base.so / libggml-cpu.so from {directory}: {exc} "
                          f"(set {_ENV} to llama-cpp-python's llama_cpp/lib)") from None
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    signatures = {
        (base, "ggml_init"): ([_InitParams], p), (base, "ggml_free"): ([p], None),
        (base, "ggml_new_tensor_1d"): ([p, c_int, i64], p), (base, "ggml_new_tensor_2d"): ([p, c_int, i64, i64], p),
        (base, "ggml_mul_mat"): ([p, p, p], p), (base, "ggml_scale"): ([p, p, ctypes.c_float], p),
        (base, "ggml_add"): ([p, p, p], p), (base, "ggml_get_rows"): ([p, p, p], p),
        (base, "ggml_new_graph"): ([p], p), (base, "ggml_build_forward_expand"): ([p, p], None),
        (base, "ggml_get_data"): ([p], p), (base, "ggml_nbytes"): ([p], ctypes.c_size_t),
        (base, "ggml_tensor_overhead"): ([], ctypes.c_size_t), (base, "ggml_graph_overhead"): ([], ctypes.c_size_t),
        (cpu, "ggml_graph_compute_with_ctx"): ([p, p, c_int], c_int), (cpu, "ggml_cpu_init"): ([], None),
    }
    for (lib, name), (args, result) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = args, result
    cpu.ggml_cpu_init()
    return base, cpu


class _Graph:
    """One ggml context: tensors from NumPy arrays, ops, one compute, float32 results back."""

    def __init__(self, base: ctypes.CDLL, cpu: ctypes.CDLL, data_bytes: int) -> None:
        self.base, self.cpu = base, cpu
        size = 4 * data_bytes + 256 * base.ggml_tensor_overhead() + base.ggml_graph_overhead() + (1 << 20)
        self.ctx = base.ggml_init(_InitParams(size, None, False))
        if not self.ctx:
            raise MemoryError(f"ggml_init({size}) failed")

    def tensor(self, array: np.ndarray, ggml_type: int | None = None) -> int:
        """A 1-D or 2-D ggml tensor holding ``array``'s bytes (NumPy [N, K] = ggml ne0 K, ne1 N)."""
        array = np.ascontiguousarray(array)
        kind = GGML_TYPES[array.dtype] if ggml_type is None else ggml_type
        if array.ndim == 1:
            t = self.base.ggml_new_tensor_1d(self.ctx, kind, array.shape[0])
        else:
            t = self.base.ggml_new_tensor_2d(self.ctx, kind, array.shape[1], array.shape[0])
        if self.base.ggml_nbytes(t) != array.nbytes:
            raise RuntimeError(f"ggml tensor of {self.base.ggml_nbytes(t)} bytes for an array of {array.nbytes}")
        ctypes.memmove(self.base.ggml_get_data(t), array.ctypes.data, array.nbytes)
        return t

    def mul_mat(self, a: int, b: int) -> int:
        return self.base.ggml_mul_mat(self.ctx, a, b)

    def scale(self, a: int, s: float) -> int:
        return self.base.ggml_scale(self.ctx, a, s)

    def add(self, a: int, b: int) -> int:
        return self.base.ggml_add(self.ctx, a, b)

    def get_rows(self, a: int, ids: int) -> int:
        return self.base.ggml_get_rows(self.ctx, a, ids)

    def compute(self, out: int, shape: tuple[int, ...]) -> np.ndarray:
        graph = self.base.ggml_new_graph(self.ctx)
        self.base.ggml_build_forward_expand(graph, out)
        status = self.cpu.ggml_graph_compute_with_ctx(self.ctx, graph, 1)
        if status != 0:
            raise RuntimeError(f"ggml_graph_compute_with_ctx returned status {status}")
        result = np.empty(shape, dtype=np.float32)
        if self.base.ggml_nbytes(out) != result.nbytes:
            raise RuntimeError(f"ggml result of {self.base.ggml_nbytes(out)} bytes, expected shape {shape}")
        ctypes.memmove(result.ctypes.data, self.base.ggml_get_data(out), result.nbytes)
        return result

    def close(self) -> None:
        self.base.ggml_free(self.ctx)


def llama_scale(params: Mapping[str, Any]) -> float:
    """The scale llama.cpp applies: the given ``scale``, else alpha / r with alpha = 0 meaning 1 (rsLoRA unknown to it)."""
    if "scale" in params:
        return float(np.float32(params["scale"]))
    alpha, r = np.float32(params["lora_alpha"]), np.float32(params["r"])
    return float(alpha / r) if alpha != 0 else 1.0


class GgmlImplementation:
    """The conformance protocol (``run``) over llama.cpp's graphs, in ggml through ctypes."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = library_dir() if directory is None else Path(directory)
        self.base, self.cpu = _load(self.directory)
        self.versions = {"ggml_lib": str(self.directory)}

    def run(self, op: str, params: dict[str, Any], inputs: Arrays) -> Arrays:
        if any(k in inputs for k in ("dropout_mask", "lora_bias")) or params.get("safe_merge"):
            raise NotImplementedError("llama.cpp has no dropout masks, lora_bias or safe merges")
        if op not in ("linear.forward", "embedding.forward", "linear.merge", "embedding.merge"):
            raise NotImplementedError(f"{op}: not an operation llama.cpp performs with an adapter")
        arrays = {k: np.asarray(v) for k, v in inputs.items()}
        for name, value in arrays.items():
            if name != "ids" and value.dtype not in GGML_TYPES:
                raise NotImplementedError(f"input {name} has dtype {value.dtype}, not a ggml float type")
        graph = _Graph(self.base, self.cpu, sum(4 * v.size for v in arrays.values()))
        try:
            return getattr(self, "_" + op.replace(".", "_"))(graph, params, arrays)
        finally:
            graph.close()

    @staticmethod
    def _factors(inputs: Arrays, out: int, inner: int, what: str) -> tuple[np.ndarray, np.ndarray]:
        A, B = inputs["A"], inputs["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != inner or B.shape != (out, A.shape[0]):
            raise ValueError(f"{what}: A {A.shape} and B {B.shape} do not fit [{out}, {inner}]")
        return A, B

    def _linear_forward(self, g: _Graph, params: Mapping[str, Any], inputs: Arrays) -> Arrays:
        x, W = inputs["x"], inputs["W"]
        W = W.T if params.get("fan_in_fan_out", False) else W  # [out, in]
        if W.ndim != 2 or x.ndim < 1 or x.shape[-1] != W.shape[1]:
            raise ValueError(f"x {x.shape} does not fit W {W.shape}")
        out, inner = W.shape
        A, B = self._factors(inputs, out, inner, "linear.forward")
        rows = x.reshape(-1, inner)
        xt = g.tensor(rows.astype(np.float32))  # llama.cpp's activations are float32
        y = g.add(g.mul_mat(g.tensor(W), xt), g.scale(g.mul_mat(g.tensor(B), g.mul_mat(g.tensor(A), xt)), llama_scale(params)))
        if "b" in inputs:
            if inputs["b"].shape != (out,):
                raise ValueError(f"bias {inputs['b'].shape} does not fit {out} outputs")
            y = g.add(y, g.tensor(inputs["b"].astype(np.float32)))
        result = g.compute(y, (rows.shape[0], out))
        return {"y": round_to(result, x.dtype).reshape(*x.shape[:-1], out)}

    def _embedding_forward(self, g: _Graph, params: Mapping[str, Any], inputs: Arrays) -> Arrays:
        ids, W = inputs["ids"], inputs["W"]
        V, D = W.shape
        A, B = self._factors(inputs, D, V, "embedding.forward")
        if ((ids < 0) | (ids >= V)).any():
            raise ValueError(f"token id outside [0, {V})")
        flat = g.tensor(ids.reshape(-1).astype(np.int32), GGML_TYPE_I32)
        delta = g.scale(g.mul_mat(g.tensor(B), g.get_rows(g.tensor(np.ascontiguousarray(A.T)), flat)), llama_scale(params))
        result = g.compute(g.add(g.get_rows(g.tensor(W), flat), delta), (ids.size, D))
        return {"y": round_to(result, W.dtype).reshape(*ids.shape, D)}

    def _merge(self, g: _Graph, params: Mapping[str, Any], W: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """round_t(W + s · right leftᵀ), computed in float32 as llama-export-lora does (factors cast to float32)."""
        f32 = [g.tensor(a.astype(np.float32)) for a in (W, left, right)]
        merged = g.add(f32[0], g.scale(g.mul_mat(f32[1], f32[2]), llama_scale(params)))
        return round_to(g.compute(merged, W.shape), W.dtype)

    def _linear_merge(self, g: _Graph, params: Mapping[str, Any], inputs: Arrays) -> Arrays:
        fifo = params.get("fan_in_fan_out", False)
        W = inputs["W"].T if fifo else inputs["W"]
        A, B = self._factors(inputs, *W.shape, "linear.merge")
        merged = self._merge(g, params, np.ascontiguousarray(W), np.ascontiguousarray(A.T), B)  # B A = B (Aᵀ)ᵀ
        return {"W_merged": np.ascontiguousarray(merged.T) if fifo else merged}

    def _embedding_merge(self, g: _Graph, params: Mapping[str, Any], inputs: Arrays) -> Arrays:
        W = inputs["W"]
        A, B = self._factors(inputs, W.shape[1], W.shape[0], "embedding.merge")
        return {"W_merged": self._merge(g, params, W, B, np.ascontiguousarray(A.T))}  # (B A)ᵀ = Aᵀ Bᵀ


def factory() -> GgmlImplementation:
    return GgmlImplementation()
