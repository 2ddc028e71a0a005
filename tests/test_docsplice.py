"""lora_ref.docsplice.splice: a generated block is replaced only where its markers are unambiguous.

The oracle is the definition written out by hand: ``head + begin + body + end + tail``; every input
whose markers are missing, repeated or reversed, or whose body holds a marker, is refused.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_ref.docsplice import splice
from lora_ref.errors import LoraRefError, MarkerError

BEGIN, END = "<!-- x:begin -->", "<!-- x:end -->"
#: Text that holds no marker (no "<" at all, so no marker can form across the joins either).
plain = st.text(alphabet=st.characters(blacklist_characters="<", blacklist_categories=("Cs",)))


@given(head=plain, old=plain, tail=plain, body=plain)
def test_splice_replaces_only_the_block(head: str, old: str, tail: str, body: str) -> None:
    text = head + BEGIN + old + END + tail
    assert splice(text, BEGIN, END, body) == head + BEGIN + body + END + tail


@given(head=plain, old=plain, tail=plain)
def test_splice_with_the_same_body_is_the_identity(head: str, old: str, tail: str) -> None:
    text = head + BEGIN + old + END + tail
    assert splice(text, BEGIN, END, old) == text


@pytest.mark.parametrize(("text", "said"), [
    ("no markers at all", f"{BEGIN} occurs 0 times"),
    (f"only {BEGIN} here", f"{END} occurs 0 times"),
    (f"only {END} here", f"{BEGIN} occurs 0 times"),
    (f"{BEGIN} a {END} b {BEGIN} c {END}", f"{BEGIN} occurs 2 times; {END} occurs 2 times"),
    (f"{BEGIN} a {END} b {END}", f"{END} occurs 2 times"),
    (f"{END} reversed {BEGIN}", f"{END} stands before {BEGIN}"),
])
def test_splice_refuses_ambiguous_markers(text: str, said: str) -> None:
    with pytest.raises(MarkerError, match="README.md: ") as error:
        splice(text, BEGIN, END, "new", document="README.md")
    assert said in str(error.value)
    assert isinstance(error.value, LoraRefError) and isinstance(error.value, ValueError)


@pytest.mark.parametrize("body", [f"a {BEGIN} b", f"a {END} b", BEGIN + END])
def test_splice_refuses_a_body_that_holds_a_marker(body: str) -> None:
    """Spliced in, the document would hold a marker twice and could never be spliced again."""
    with pytest.raises(MarkerError, match="holds the marker"):
        splice(f"head {BEGIN} old {END} tail", BEGIN, END, body)


def test_splice_refuses_markers_that_contain_each_other() -> None:
    """``<!-- x -->`` inside ``<!-- x --> more``: occurrences could not be told apart (a caller's bug)."""
    with pytest.raises(ValueError, match="neither may contain the other"):
        splice("<!-- x --> more", "<!-- x -->", "<!-- x --> more", "")
    with pytest.raises(ValueError, match="non-empty"):
        splice("text", "", END, "")
