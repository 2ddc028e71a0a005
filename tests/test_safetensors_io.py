"""Our safetensors reader/writer: round trip, byte compatibility with the `safetensors` package,
the streaming writer's contract, and typed errors for malformed files (never a partial file)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as st_numpy
from hypothesis import given
from hypothesis import strategies as st

from lora_ref.dtypes import bfloat16, bits_of
from lora_ref.errors import FileFormatError, LoraRefError
from lora_ref.safetensors_io import (
    CODE_TO_DTYPE,
    SafetensorsFile,
    SafetensorsWriter,
    iter_tensors,
    load_file,
    read_metadata,
    save_file,
)

ALL_DTYPES = list(CODE_TO_DTYPE.values())
NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz._0123456789", min_size=1, max_size=12)
TEXT = st.text(max_size=8)  # any Unicode: the header is UTF-8 JSON


@st.composite
def arrays(draw: st.DrawFn, dtypes: list[np.dtype] = ALL_DTYPES) -> np.ndarray:
    """An array of any supported dtype and small shape (0-d and empty included), any bit pattern."""
    dtype = draw(st.sampled_from(dtypes))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    count = int(np.prod(shape, dtype=np.int64))
    raw = draw(st.binary(min_size=count * dtype.itemsize, max_size=count * dtype.itemsize))
    array = np.frombuffer(raw, dtype=np.uint8).view(dtype).reshape(shape) if count else np.zeros(shape, dtype)
    if dtype == np.dtype("?"):
        array = np.asarray(array.view(np.uint8) % 2 == 1)  # bool must be 0 or 1
    return array


def tensor_dicts(dtypes: list[np.dtype] = ALL_DTYPES) -> st.SearchStrategy[dict[str, np.ndarray]]:
    # "__metadata__" is the header's reserved key (refused by our writer; test_reserved_name_refused)
    return st.dictionaries((NAMES | TEXT).filter(lambda n: n and n != "__metadata__"), arrays(dtypes), max_size=5)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@given(tensors=tensor_dicts(), metadata=st.dictionaries(TEXT, TEXT, max_size=3))
def test_round_trip_every_dtype_bitwise(tmp_path_factory: pytest.TempPathFactory, tensors: dict, metadata: dict) -> None:
    path = tmp_path_factory.mktemp("rt") / "t.safetensors"
    save_file(path, tensors, metadata)
    loaded = load_file(path)
    assert list(loaded) == list(tensors)  # file order is the mapping's order
    assert all(same_bits(loaded[k], tensors[k]) for k in tensors)
    assert read_metadata(path) == metadata
    streamed = dict(iter_tensors(path))
    assert all(same_bits(streamed[k], tensors[k]) for k in tensors)


#: The safetensors package's Dtype enum order (its serializer lays tensors out by dtype, latest
#: in this enum first, then by name): BOOL < U8 < I8 < I16 < U16 < F16 < BF16 < I32 < U32 < F32
#: < F64 < I64 < U64 (observed on safetensors 0.8, the order of the enum's declaration).
_PACKAGE_DTYPE_ORDER = ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]


def _safetensors_order(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The order the safetensors package lays tensors out in (see above)."""
    rank = {CODE_TO_DTYPE[code]: i for i, code in enumerate(_PACKAGE_DTYPE_ORDER)}
    return dict(sorted(tensors.items(), key=lambda kv: (-rank[kv[1].dtype], kv[0].encode())))


#: dtypes the safetensors package's NumPy API handles (bfloat16 through ml_dtypes, where supported).
def _package_dtypes() -> list[np.dtype]:
    supported = []
    for dtype in ALL_DTYPES:
        try:
            st_numpy.load(st_numpy.save({"x": np.zeros(2, dtype)}))
        except Exception:  # noqa: BLE001 - the package raises various types for an unknown dtype
            continue
        supported.append(dtype)
    return supported


PACKAGE_DTYPES = _package_dtypes()


def test_package_supports_the_float_storage_dtypes() -> None:
    assert {np.dtype("<f4"), np.dtype("<f2"), np.dtype("<f8")} <= set(PACKAGE_DTYPES)


# An empty metadata dict is written as "__metadata__":{} by the package and omitted by us, and the
# package orders several metadata keys by hash (varies per process): both valid, so at most one key.
@given(tensors=tensor_dicts(PACKAGE_DTYPES), metadata=st.none() | st.dictionaries(TEXT, TEXT, min_size=1, max_size=1))
def test_byte_identical_to_safetensors_package(tmp_path_factory: pytest.TempPathFactory, tensors: dict, metadata) -> None:
    path = tmp_path_factory.mktemp("bytes") / "ours.safetensors"
    ordered = _safetensors_order(tensors)
    save_file(path, ordered, metadata)
    theirs = st_numpy.save(tensors, metadata=metadata)
    assert path.read_bytes() == theirs
    # and each reads the other's file with identical bits
    from_theirs = st_numpy.load(path.read_bytes())
    assert set(from_theirs) == set(tensors) and all(same_bits(from_theirs[k], tensors[k]) for k in tensors)


@given(tensors=tensor_dicts(PACKAGE_DTYPES))
def test_we_read_package_files_and_package_reads_ours(tmp_path_factory: pytest.TempPathFactory, tensors: dict) -> None:
    root = tmp_path_factory.mktemp("cross")
    st_numpy.save_file(tensors, str(root / "theirs.safetensors"))
    ours = load_file(root / "theirs.safetensors")
    assert set(ours) == set(tensors) and all(same_bits(ours[k], tensors[k]) for k in tensors)
    save_file(root / "ours.safetensors", tensors)  # our order, not theirs
    theirs = st_numpy.load_file(str(root / "ours.safetensors"))
    assert set(theirs) == set(tensors) and all(same_bits(theirs[k], tensors[k]) for k in tensors)


def test_bfloat16_special_bits_survive(tmp_path: Path) -> None:
    raw = np.array([0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC1, 0xFFA5, 0x0001, 0x7F7F], dtype=np.uint16)
    tensors = {"w": raw.view(bfloat16)}
    save_file(tmp_path / "b.safetensors", tensors)
    assert np.array_equal(bits_of(load_file(tmp_path / "b.safetensors")["w"]), raw)
    assert json.loads((tmp_path / "b.safetensors").read_bytes()[8:].split(b"}}")[0] + b"}}")["w"]["dtype"] == "BF16"


# -- streaming writer ----------------------------------------------------------------------------


@given(tensors=tensor_dicts())
def test_streaming_writer_equals_save_file(tmp_path_factory: pytest.TempPathFactory, tensors: dict) -> None:
    root = tmp_path_factory.mktemp("stream")
    save_file(root / "whole.safetensors", tensors)
    specs = [(k, v.dtype, v.shape) for k, v in tensors.items()]
    with SafetensorsWriter(root / "streamed.safetensors", specs) as writer:
        for name, array in tensors.items():
            writer.write(name, array)
    assert (root / "streamed.safetensors").read_bytes() == (root / "whole.safetensors").read_bytes()


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize(
    "mistake",
    ["wrong_name", "wrong_dtype", "wrong_shape", "extra", "missing", "exception"],
)
def test_streaming_writer_leaves_no_file_on_error(tmp_path: Path, mistake: str) -> None:
    a, b = np.ones((2, 3), np.float32), np.zeros(4, np.float16)
    specs = [("a", a.dtype, a.shape), ("b", b.dtype, b.shape)]
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous contents")
    expected_error = RuntimeError if mistake == "exception" else FileFormatError
    with pytest.raises(expected_error):
        with SafetensorsWriter(target, specs) as writer:
            writer.write("a", a)
            if mistake == "wrong_name":
                writer.write("c", b)
            elif mistake == "wrong_dtype":
                writer.write("b", b.astype(np.float32))
            elif mistake == "wrong_shape":
                writer.write("b", b.reshape(2, 2))
            elif mistake == "extra":
                writer.write("b", b)
                writer.write("c", b)
            elif mistake == "exception":
                raise RuntimeError("interrupted")
            # "missing": close without writing b
    assert target.read_bytes() == b"previous contents"  # untouched, and no temporary left
    assert _leftovers(tmp_path) == ["out.safetensors"]


def test_duplicate_names_refused(tmp_path: Path) -> None:
    with pytest.raises(FileFormatError):
        SafetensorsWriter(tmp_path / "d.safetensors", [("a", np.float32, (1,)), ("a", np.float32, (1,))])


def test_reserved_name_refused(tmp_path: Path) -> None:
    with pytest.raises(FileFormatError, match="__metadata__"):
        save_file(tmp_path / "r.safetensors", {"__metadata__": np.zeros(1, np.float32)})
    assert _leftovers(tmp_path) == []


def test_unstorable_dtype_refused(tmp_path: Path) -> None:
    with pytest.raises(FileFormatError, match="x"):
        save_file(tmp_path / "c.safetensors", {"x": np.zeros(2, np.complex64)})
    assert _leftovers(tmp_path) == []


def test_get_returns_read_only_view_without_copy(tmp_path: Path) -> None:
    save_file(tmp_path / "v.safetensors", {"w": np.arange(12, dtype=np.float32).reshape(3, 4)})
    with SafetensorsFile(tmp_path / "v.safetensors") as handle:
        view = handle.get("w")
        assert not view.flags.writeable and not view.flags.owndata
        assert np.array_equal(view, np.arange(12).reshape(3, 4))
        del view
        with pytest.raises(FileFormatError, match="nope"):
            handle.get("nope")


# -- malformed files ---------------------------------------------------------------------------


def _valid_file(tmp_path: Path) -> bytes:
    save_file(tmp_path / "ok.safetensors", {"a": np.arange(6, dtype=np.float32), "b": np.ones(3, np.float16)}, {"m": "1"})
    return (tmp_path / "ok.safetensors").read_bytes()


@given(data=st.data())
def test_any_truncation_is_a_typed_error(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    root = tmp_path_factory.mktemp("trunc")
    good = _valid_file(root)
    cut = data.draw(st.integers(0, len(good) - 1))
    (root / "cut.safetensors").write_bytes(good[:cut])
    with pytest.raises(FileFormatError):
        load_file(root / "cut.safetensors")


def _with_header(header: object, data: bytes = b"\0" * 24) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    "content",
    [
        _with_header(b"not json"),
        _with_header(b"\xff\xfe"),
        _with_header([1, 2]),
        _with_header({"a": "x"}),
        _with_header({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}),
        _with_header({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}),
        _with_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}),  # size disagrees
        _with_header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}),
        _with_header({"a": {"dtype": "F32", "shape": [10], "data_offsets": [0, 40]}}),  # past the end
        _with_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}),  # overlap
        _with_header({"__metadata__": {"k": 1}}),
        struct.pack("<Q", 10**12) + b"{}",
        b"\x01\x02",
        b"",
    ],
    ids=["not-json", "not-utf8", "not-object", "entry-not-object", "dtype", "shape", "size", "reversed",
         "past-end", "overlap", "metadata", "huge-header", "short", "empty"],
)
def test_malformed_file_is_a_typed_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(FileFormatError) as info:
        load_file(path)
    assert isinstance(info.value, LoraRefError) and str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(FileFormatError, match="no such file"):
        load_file(tmp_path / "absent.safetensors")
    with pytest.raises(FileFormatError, match="directory"):
        load_file(tmp_path)
