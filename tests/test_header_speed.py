"""The fast paths of the safetensors header and of gathered writes give what the plain ones give.

- The text-built header against ``json.dumps`` of the header dict.
- The fast decode (plain ``json.loads`` when the compact re-encoding is the text; one check per
  distinct layout) against a decode that checks every object with a hook.
- ``OutputFile(gather=True)`` against plain writes: the same file for any mix of writes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from hypothesis import example, given
from hypothesis import strategies as st

from lora_ref.atomic import GATHER_SMALL, OutputFile
from lora_ref.errors import FileFormatError
from lora_ref.safetensors_io import DTYPE_TO_CODE, _header_bytes, _parse_header


# -- the safetensors header ----------------------------------------------------------------------------

_NAMES = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=8).filter(lambda n: n != "__metadata__")


@given(st.lists(st.tuples(_NAMES, st.sampled_from(sorted(DTYPE_TO_CODE, key=str)),
                          st.lists(st.integers(0, 5), max_size=3).map(tuple)), max_size=6, unique_by=lambda s: s[0]),
       st.none() | st.dictionaries(_NAMES, st.text(st.characters(blacklist_categories=["Cs"]), max_size=6), max_size=3))
def test_header_bytes_are_json_dumps(specs, metadata) -> None:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in specs:
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        header[name] = {"dtype": DTYPE_TO_CODE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    assert _header_bytes(specs, metadata) == struct.pack("<Q", len(raw)) + raw


class _Duplicate(Exception):
    pass


def _checked(pairs):
    if len({k for k, _ in pairs}) != len(pairs):
        raise _Duplicate
    return dict(pairs)


#: JSON fragments a hostile header is made of: entries, duplicates, nesting, braces in strings, escapes.
_FRAGMENTS = [
    '"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}', '"u":{"dtype":"F32","shape":[],"data_offsets":[4,8]}',
    '"t":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}', '"v":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}',
    '"w{":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}', '"x":{"dtype":"F32","shape":[{"a":1,"a":2}],"data_offsets":[0,4]}',
    '"y":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":{"k":1,"k":1}}', '"__metadata__":{"a":"b"}',
    '"__metadata__":{"a":"b","a":"c"}', '"z":{"dtype":"F32","shape":[true],"data_offsets":[8,12]}',
    '"q":{"dtype":"F32","shape":[1.0],"data_offsets":[12,16]}', '"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}',
    '"s":{"dtype":"F32", "shape":[1],"data_offsets":[4,8]}', '"r":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}',
]


@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=5), st.sampled_from(["", " ", "  "]))
@example([_FRAGMENTS[0], _FRAGMENTS[9]], "")  # [true] after [1]: one layout check must not pass both
@example([_FRAGMENTS[0], _FRAGMENTS[10]], " ")  # [1.0] after [1]
@example([_FRAGMENTS[3]], "")
@example([_FRAGMENTS[4], _FRAGMENTS[5]], "")  # a brace in a name next to a nested object with a duplicate
def test_header_parse_is_the_hooked_parse(fragments, padding) -> None:
    """The fast decode refuses and accepts exactly what a decode checking every object refuses and accepts."""
    raw = ("{" + ",".join(fragments) + "}" + padding).encode("utf-8")
    path = Path("h.safetensors")
    try:
        json.loads(raw.decode("utf-8"), object_pairs_hook=_checked)
        duplicate = False
    except _Duplicate:
        duplicate = True
    try:
        infos, metadata = _parse_header(path, raw, 16)
        outcome = ({n: (i.dtype, i.shape, i.begin, i.end) for n, i in infos.items()}, metadata)
    except FileFormatError as exc:
        outcome = str(exc)
    if duplicate:
        assert isinstance(outcome, str) and "appears twice" in outcome
    else:
        assert not (isinstance(outcome, str) and "appears twice" in outcome)
    if not isinstance(outcome, str):  # accepted: every entry exactly as declared, integer axes only
        decoded = json.loads(raw)
        for name, (dtype, shape, begin, end) in outcome[0].items():
            assert DTYPE_TO_CODE[dtype] == decoded[name]["dtype"] and list(shape) == decoded[name]["shape"]
            assert all(type(d) is int for d in decoded[name]["shape"]) and [begin, end] == decoded[name]["data_offsets"]


# -- gathered writes ----------------------------------------------------------------------------------

@given(st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, 3 * GATHER_SMALL // 2)),
    st.tuples(st.just("skip"), st.integers(0, 64)),
    st.tuples(st.just("at"), st.integers(0, 4096)),
    st.tuples(st.just("flush"), st.just(0))), max_size=12))
def test_gathered_writes_make_the_same_file(tmp_path_factory, steps) -> None:
    folder = tmp_path_factory.mktemp("gather")
    files = {}
    for gather in (False, True):
        path = folder / f"{gather}.bin"
        path.touch()
        out = OutputFile(path, gather=gather)
        rng = np.random.default_rng(0)
        for op, n in steps:
            data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            if op == "write":
                out.write(data)
            elif op == "skip":  # a reserved range, filled (or not) by positional writes
                out.offset += n
            elif op == "at":
                out.write_at(data[:64], n)
            else:
                out.flush()
        out.close()
        files[gather] = path.read_bytes()
    assert files[True] == files[False]
