"""A strict, streaming reader and writer for the safetensors format, in NumPy.

Layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of
the header) plus an optional ``"__metadata__"`` dict of strings, then the raw little-endian
tensor bytes.

Why not only the ``safetensors`` package: it has no bfloat16 in its NumPy API, it cannot
write a file one tensor at a time (needed to merge checkpoints larger than memory), and we
want every malformation reported as a typed :class:`FileFormatError` before any allocation.
Tests check byte compatibility against the ``safetensors`` package in both directions.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import OutputFile, atomic_path
from .dtypes import bfloat16
from .errors import FileFormatError
from .inputs import open_regular

#: safetensors dtype codes <-> numpy dtypes (little endian).
CODE_TO_DTYPE: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": bfloat16,
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
DTYPE_TO_CODE: dict[np.dtype, str] = {dtype: code for code, dtype in CODE_TO_DTYPE.items()}

#: Headers larger than this are refused before they are read (the format's own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000
#: Most axes a tensor may declare (NumPy 1.x's limit; real weights have a handful).
MAX_NDIM = 32
#: A shape's element count, zero axes counted as 1, times the itemsize must stay below this, so
#: NumPy can represent even an empty tensor of that shape (it checks the product of all axes).
MAX_NOMINAL_BYTES = 2**62


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _fail(path: Path, message: str) -> FileFormatError:
    return FileFormatError(f"{path}: not a valid safetensors file: {message}")


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json object hook: refuse duplicate keys (json.loads would silently keep the last)."""
    result = dict(pairs)
    if len(result) != len(pairs):  # some key came twice: name the first repeated one
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return result


def _decode(path: Path, raw: bytes) -> object:
    """The header's JSON value, every object in it checked for duplicate keys.

    Fast path: plain ``json.loads`` (no Python call per object), accepted when the compact
    re-encoding of the value is the text itself (trailing padding spaces aside), as for every
    header lora-ref, the safetensors package and serde_json write. Then no key can have been
    dropped: the re-encoding holds one pair per key of the decoded objects, and the text the same
    pairs. Any other text is decoded again with :func:`_unique_keys` on every object.
    """
    try:
        text = raw.decode("utf-8")
        value = json.loads(text)
        try:
            compact = json.dumps(value, separators=(",", ":"), ensure_ascii=False) == text.rstrip(" ")
        except (ValueError, RecursionError):
            compact = False
        return value if compact else json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise _fail(path, f"key {exc.args[0]!r} appears twice in the header") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and integers longer than Python's digit limit;
        # RecursionError a hostile nesting depth.
        raise _fail(path, f"header is not UTF-8 JSON ({type(exc).__name__}: {str(exc)[:200]})") from None


def _short(value: object, limit: int = 120) -> str:
    """repr(value) cut to ``limit`` characters, so a hostile header cannot flood a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_unicode(text: str) -> bool:
    """Whether ``text`` encodes to UTF-8 (JSON escapes can smuggle in lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _layout(path: Path, name: str, code: object, shape: object) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, byte count) of a declared ``dtype`` code and ``shape``, or the FileFormatError."""
    if not isinstance(code, str) or code not in CODE_TO_DTYPE:
        raise _fail(path, f"tensor {_short(name)} has unsupported dtype {_short(code)}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(type(d) is int and d >= 0 for d in shape)
        or math.prod(max(d, 1) for d in shape) * CODE_TO_DTYPE[code].itemsize
        >= MAX_NOMINAL_BYTES
    ):
        raise _fail(path, f"tensor {_short(name)} has an invalid shape {_short(shape)} (at most {MAX_NDIM} "
                          f"non-negative integer axes, under {MAX_NOMINAL_BYTES} bytes)")
    dtype = CODE_TO_DTYPE[code]
    return dtype, tuple(shape), math.prod(shape) * dtype.itemsize


@contextlib.contextmanager
def _collector_paused():
    """The cyclic garbage collector off for a block that allocates many containers and frees none
    (a header of 100,000 entries: the collector's passes over them would cost twice the parse)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@_collector_paused()
def _parse_header(path: Path, raw: bytes, data_size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The validated tensor table and metadata of a header (:func:`_decode`, then every entry checked).

    Entries declaring the same dtype code and shape are checked once (``layouts``, keyed by the code,
    the axes and the type of each axis, so ``[true]`` or ``[1.0]`` never passes for ``[1]``).
    """
    header = _decode(path, raw)
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(path, "__metadata__ must map strings to strings")
    if not all(_is_unicode(k) and _is_unicode(v) for k, v in metadata.items()):
        raise _fail(path, "a __metadata__ string holds an unpaired surrogate (not valid UTF-8)")
    # a lone surrogate can only come from a \\u escape: without one, every decoded name is valid UTF-8
    escapes = b"\\u" in raw
    infos: dict[str, TensorInfo] = {}
    layouts: dict[tuple, tuple[np.dtype, tuple[int, ...], int]] = {}
    ordered, last_end = True, 0  # entries in offset order need no sort for the overlap check
    for name, entry in header.items():
        if escapes and not _is_unicode(name):
            raise _fail(path, f"tensor name {_short(name)} holds an unpaired surrogate (not valid UTF-8)")
        if not isinstance(entry, dict):
            raise _fail(path, f"entry {_short(name)} is not an object")
        code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        try:  # only valid layouts are stored: a hit is a list of the same non-negative ints
            key: tuple | None = (code, tuple(shape), tuple(map(type, shape)))
            layout = layouts.get(key)
        except TypeError:  # shape not iterable, or code or an axis unhashable
            key, layout = None, None
        if layout is None:
            layout = _layout(path, name, code, shape)
            if key is not None:
                layouts[key] = layout
        dtype, dims, expected = layout
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise _fail(path, f"tensor {_short(name)} has data_offsets {_short(offsets)} outside the {data_size}-byte data section")
        begin, end = offsets
        if end - begin != expected:
            raise _fail(
                path,
                f"tensor {_short(name)}: {end - begin} bytes for shape {shape} of {code} (needs {expected})",
            )
        if end > begin:
            ordered = ordered and begin >= last_end
            last_end = end
        infos[name] = TensorInfo(name, dtype, dims, begin, end)
    if not ordered:
        spans = sorted((info.begin, info.end, info.name) for info in infos.values() if info.end > info.begin)
        for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:]):
            if begin_b < end_a:
                raise _fail(path, f"tensors {_short(name_a)} and {_short(name_b)} overlap")
    return infos, metadata


#: Headers at least this long are remembered once parsed (:func:`_parsed_header`).
_REMEMBER_HEADER_BYTES = 1 << 16
_parsed_headers: dict[tuple[bytes, int], tuple[dict[str, TensorInfo], dict[str, str]]] = {}


def _parsed_header(path: Path, raw: bytes, data_size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """:func:`_parse_header`, remembered for the last two long headers (copies of the dicts each time).

    One command reads a large checkpoint's header several times (merge record, progress, the merge
    itself); parsing and checking 100,000 entries costs about a second each time. The key is the
    header's bytes and the data section's size, everything the result depends on, so a hit returns
    exactly what parsing again would (errors are never remembered: they name the path).
    """
    if len(raw) < _REMEMBER_HEADER_BYTES:
        return _parse_header(path, raw, data_size)
    key = (raw, data_size)
    if key not in _parsed_headers:
        parsed = _parse_header(path, raw, data_size)
        while len(_parsed_headers) >= 2:
            del _parsed_headers[next(iter(_parsed_headers))]
        _parsed_headers[key] = parsed
    infos, metadata = _parsed_headers[key]
    return dict(infos), dict(metadata)


class SafetensorsFile:
    """A memory-mapped, validated safetensors file. Use as a context manager.

    ``get`` returns a read-only view into the mapping (no copy), so reading a checkpoint
    larger than memory tensor by tensor keeps the resident set small.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file = open_regular(self.path, ".safetensors file")
        try:
            size = os.fstat(self._file.fileno()).st_size
            if size < 8:
                raise _fail(self.path, f"{size} bytes is shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", self._file.read(8))
            if header_len > MAX_HEADER_BYTES:
                raise _fail(self.path, f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + header_len > size:
                raise _fail(self.path, f"header length {header_len} runs past the end of the {size}-byte file")
            raw = self._file.read(header_len)
            self._data_start = 8 + header_len
            self.tensors, self.metadata = _parsed_header(self.path, raw, size - self._data_start)
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file. Views returned by ``get`` must not be used afterwards."""
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view is still alive: the mapping closes when it is collected
                pass
            self._map = None
        self._file.close()

    def keys(self) -> list[str]:
        """Tensor names in file order (by offset)."""
        return sorted(self.tensors, key=lambda name: self.tensors[name].begin)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def get(self, name: str) -> np.ndarray:
        """A read-only array viewing tensor ``name`` in the mapped file."""
        if name not in self.tensors:
            raise FileFormatError(f"{self.path}: no tensor named {name!r}")
        info = self.tensors[name]
        if info.nbytes == 0:
            return np.zeros(info.shape, dtype=info.dtype)
        assert self._map is not None
        flat = np.frombuffer(self._map, dtype=info.dtype, count=info.nbytes // info.dtype.itemsize,
                             offset=self._data_start + info.begin)
        return flat.reshape(info.shape)


def load_file(path: str | os.PathLike[str], names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Read tensors (all, or ``names``) into memory as writable arrays, in file order."""
    with SafetensorsFile(path) as handle:
        wanted = handle.keys() if names is None else list(names)
        if names is not None or handle._map is None:
            return {name: np.array(handle.get(name)) for name in wanted}
        # the whole data section copied once; each tensor a writable view of its own bytes in it
        # (disjoint: the header check refuses overlaps), copied apart where its offset is unaligned
        data = np.frombuffer(handle._map, dtype=np.uint8, offset=handle._data_start).copy()
        tensors = {}
        for name in wanted:
            info = handle.tensors[name]
            if info.nbytes == 0:
                tensors[name] = np.zeros(info.shape, dtype=info.dtype)
                continue
            view = data[info.begin: info.end].view(info.dtype).reshape(info.shape)
            tensors[name] = view if info.begin % info.dtype.itemsize == 0 else view.copy()
        return tensors


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` dict of a safetensors file."""
    with SafetensorsFile(path) as handle:
        return dict(handle.metadata)


def _header_bytes(specs: Iterable[tuple[str, np.dtype, tuple[int, ...]]], metadata: Mapping[str, str] | None) -> bytes:
    """The 8-byte length and the header: the bytes ``json.dumps(header, separators=(",", ":"),
    ensure_ascii=False)`` gives (as serde_json writes it), padded with spaces to 8-byte alignment.

    Built as text entry by entry (names through the JSON encoder's own string escaping), without
    a dict per tensor: the same bytes, at a fraction of the cost for 100,000 tensors.
    """
    parts = []
    if metadata:
        encoded = json.dumps({str(k): str(v) for k, v in metadata.items()}, separators=(",", ":"), ensure_ascii=False)
        parts.append(f'"__metadata__":{encoded}')
    offset = 0
    axes: dict[tuple[int, ...], str] = {}  # shape -> its JSON list body
    for name, dtype, shape in specs:
        if dtype not in DTYPE_TO_CODE:
            raise FileFormatError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
        dims = axes.get(shape)
        if dims is None:
            dims = axes[shape] = ",".join(str(int(d)) for d in shape)
        parts.append(f'{_json_string(name)}:{{"dtype":"{DTYPE_TO_CODE[dtype]}","shape":[{dims}],'
                     f'"data_offsets":[{offset},{offset + nbytes}]}}')
        offset += nbytes
    raw = ("{" + ",".join(parts) + "}").encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
    return struct.pack("<Q", len(raw)) + raw


#: A str as a JSON string literal, non-ASCII kept (what json.dumps(..., ensure_ascii=False) writes).
_json_string = json.encoder.encode_basestring


class OutputTensor:
    """One tensor's bytes in a file being written, filled by row blocks through :func:`write_at`.

    Stands where a merge would otherwise write into a writable memory map (a full disk would then
    be a SIGBUS): ``out[rows] = block`` writes rows ``rows`` of the first axis with ``pwrite``
    (threads may fill disjoint rows), ``put_flat`` scatters single elements, and ``view()`` (or
    ``np.asarray(out)``) is a read-only mapping of what has been written so far (unwritten bytes
    read as zeros). Shape [d0, ...], dtype little endian. ``mapped`` gives the whole file's
    read-only mapping (uint8), shared by the writer's tensors: one mapping per file, not per tensor.
    """

    def __init__(self, out: OutputFile, offset: int, dtype: np.dtype, shape: tuple[int, ...],
                 mapped: Callable[[], np.ndarray]) -> None:
        self._out, self._offset, self._mapped = out, offset, mapped
        self.dtype, self.shape = dtype, shape
        self.ndim, self.size = len(shape), math.prod(shape)
        self.nbytes = self.size * dtype.itemsize
        self._row_bytes = (self.nbytes // shape[0]) if shape and shape[0] else self.nbytes
        self._view: np.ndarray | None = None

    def _rows(self, key: object) -> tuple[int, int]:
        if key is Ellipsis or key == ():
            return 0, self.shape[0] if self.shape else 1
        if isinstance(key, slice) and key.step in (None, 1) and self.shape:
            start, stop, _ = key.indices(self.shape[0])
            return start, max(start, stop)
        raise TypeError(f"an output tensor is written by row slices, not {key!r}")

    def __setitem__(self, key: object, value: np.ndarray) -> None:
        start, stop = self._rows(key)
        rows_shape = (stop - start, *self.shape[1:]) if self.shape else ()
        block = np.ascontiguousarray(np.broadcast_to(np.asarray(value, dtype=self.dtype), rows_shape))
        if block.size:
            self._out.write_at(block.reshape(-1).view(np.uint8).data, self._offset + start * self._row_bytes)

    def put_flat(self, indices: np.ndarray, values: np.ndarray, block_bytes: int = 2**16) -> None:
        """out.reshape(-1)[indices] = values, one read-modify-write per touched run of about
        ``block_bytes``. Ascending ``indices`` (an exact residual's) are used without a copy."""
        if indices.size > 1 and not np.all(indices[1:] >= indices[:-1]):
            order = np.argsort(indices, kind="stable")  # equal indices keep their order: the last wins
            indices, values = indices[order], values[order]
        step = max(1, block_bytes // self.dtype.itemsize)
        flat = self.view().reshape(-1)
        i = 0
        while i < indices.size:
            begin = int(indices[i]) // step * step
            end = min(begin + step, self.size)
            j = int(np.searchsorted(indices, end, side="left"))
            chunk = np.array(flat[begin:end])
            chunk[indices[i:j].astype(np.int64) - begin] = values[i:j]
            self._out.write_at(chunk.view(np.uint8).data, self._offset + begin * self.dtype.itemsize)
            i = j

    def view(self) -> np.ndarray:
        """A read-only array of the tensor as written so far (a shared read-only mapping)."""
        if self._view is None:
            if self.nbytes == 0:
                self._view = np.zeros(self.shape, dtype=self.dtype)
            else:
                self._view = self._mapped()[self._offset: self._offset + self.nbytes].view(self.dtype).reshape(self.shape)
        return self._view

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        view = self.view()
        return view if dtype is None else view.astype(dtype)

    def __getitem__(self, key: object) -> np.ndarray:
        return self.view()[key]


class SafetensorsWriter:
    """Write a safetensors file one tensor at a time, atomically.

    The header is written first from ``specs`` (name, dtype, shape); then ``write`` (or
    ``reserve``) must be called once per tensor in that order. On an exception, or if tensors are
    missing at close, nothing is left at ``path``. Every byte goes through
    :func:`lora_ref.atomic.write_at` (no writable memory maps).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        specs: Iterable[tuple[str, np.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self._specs = [(name, np.dtype(dtype), tuple(int(d) for d in shape)) for name, dtype, shape in specs]
        names = [spec[0] for spec in self._specs]
        if len(set(names)) != len(names):
            raise FileFormatError(f"{self.path}: duplicate tensor names")
        if "__metadata__" in names:  # the header's reserved key: the file would be unreadable
            raise FileFormatError(f"{self.path}: '__metadata__' is reserved and cannot name a tensor")
        self._header = _header_bytes(self._specs, metadata)
        self._size = len(self._header) + sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in self._specs)
        self._next = 0
        self._map: np.ndarray | None = None

    def __enter__(self) -> SafetensorsWriter:
        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        try:
            self._handle = OutputFile(tmp, gather=True)
            self._handle.write(self._header)
            self._handle.extend_to(self._size)  # the final size at once: reserved tensors read as zeros until written
        except BaseException as exc:
            self._atomic.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def _check_next(self, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        if self._next >= len(self._specs):
            raise FileFormatError(f"{self.path}: unexpected extra tensor {name!r}")
        want_name, want_dtype, want_shape = self._specs[self._next]
        if name != want_name or dtype != want_dtype or shape != want_shape:
            raise FileFormatError(
                f"{self.path}: expected tensor {want_name!r} {want_dtype} {want_shape}, "
                f"got {name!r} {dtype} {shape}"
            )

    def write(self, name: str, array: np.ndarray) -> None:
        """Append the next tensor; its name, dtype and shape must match the declared spec.

        A contiguous little-endian array (a memory-mapped input tensor, say) is written from its
        own buffer, without an in-memory copy.
        """
        array = np.asarray(array)
        self._check_next(name, array.dtype, array.shape)
        array = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
        if array.size:
            self._handle.write(array.reshape(-1).view(np.uint8).data)
        self._next += 1

    def write_run(self, names: Sequence[str], stacked: np.ndarray) -> None:
        """Append the next ``len(names)`` tensors, ``stacked[i]`` being ``names[i]``, in one write
        (each name, dtype and shape checked against its spec as :meth:`write` does)."""
        stacked = np.asarray(stacked)
        if len(names) != stacked.shape[0]:
            raise ValueError(f"{len(names)} names for a stack of {stacked.shape[0]} tensors")
        for name in names:
            self._check_next(name, stacked.dtype, stacked.shape[1:])
            self._next += 1
        stacked = np.ascontiguousarray(stacked).astype(stacked.dtype.newbyteorder("<"), copy=False)
        if stacked.size:
            self._handle.write(stacked.reshape(-1).view(np.uint8).data)

    def reserve(self, name: str) -> OutputTensor:
        """The next tensor's place in the output, to fill by row blocks (:class:`OutputTensor`).

        Lets a merge write a tensor larger than memory block by block (``merge(..., out=...)``):
        only the blocks being computed are in memory. Contents not assigned read as zeros.
        """
        if self._next >= len(self._specs):
            raise FileFormatError(f"{self.path}: unexpected extra tensor {name!r}")
        _, want_dtype, want_shape = self._specs[self._next]
        self._check_next(name, want_dtype, want_shape)
        self._next += 1
        tensor = OutputTensor(self._handle, self._handle.offset, want_dtype, want_shape, self._mapped)
        self._handle.offset += tensor.nbytes
        return tensor

    def _mapped(self) -> np.ndarray:
        """The file being written as a read-only uint8 mapping (made once, on the first request)."""
        self._handle.flush()  # what was gathered, so the mapping shows it
        if self._map is None:
            self._map = np.memmap(self._handle.path, dtype=np.uint8, mode="r", shape=(self._size,))
        return self._map

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is not None:
            self._handle.discard()
        else:
            try:
                self._handle.close()  # writes what was gathered
            except BaseException as error:
                self._atomic.__exit__(type(error), error, error.__traceback__)
                raise
        if exc is None and self._next != len(self._specs):
            missing = self._specs[self._next][0]
            exc = FileFormatError(f"{self.path}: tensor {missing!r} was declared but never written")
            self._atomic.__exit__(type(exc), exc, None)
            raise exc
        self._atomic.__exit__(exc_type, exc, tb)


def save_file(
    path: str | os.PathLike[str], tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` (in the mapping's order) to ``path`` atomically."""
    arrays = {name: np.asarray(array) for name, array in tensors.items()}
    specs = [(name, array.dtype, array.shape) for name, array in arrays.items()]
    with SafetensorsWriter(path, specs, metadata) as writer:
        for name, array in arrays.items():
            writer.write(name, array)


def iter_tensors(path: str | os.PathLike[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, read-only view) for each tensor in file order, keeping only the mapping open."""
    with SafetensorsFile(path) as handle:
        for name in handle.keys():
            yield name, handle.get(name)
