"""lora_ref.cli.printable: untrusted text becomes one safe terminal line (escaped, shortened, cut)."""

from __future__ import annotations

import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from lora_ref.cli import MAX_MESSAGE, MAX_WORD, printable


def test_escapes_terminal_sequences_and_invisible_characters() -> None:
    text = "a\x1b]0;title\x07b\x9b31mc\u202ed\u200be\ufefff\r\n\tg"
    assert printable(text) == "a\\x1b]0;title\\x07b\\x9b31mc\\u202ed\\u200be\\ufefff\\r\\n\\tg"


def test_long_names_keep_start_end_and_length() -> None:
    name = "layer." + "q" * 1_000_000 + ".end"
    out = printable(f"module {name} is missing")
    assert out.startswith("module layer.qqq") and out.endswith(".end is missing")
    assert f"[{len(name)} chars]" in out and len(out) < 400
    assert printable("x" * MAX_WORD) == "x" * MAX_WORD  # at the limit: unchanged


@given(st.text(max_size=3000))
def test_any_text_is_one_printable_bounded_line(text: str) -> None:
    out = printable(text)
    assert "\n" not in out and "\r" not in out
    assert not any(unicodedata.category(c) == "Cc" for c in out)
    assert len(out) <= MAX_MESSAGE + 40
