"""Generated blocks inside hand-written documents: one splice, refused unless it is unambiguous.

A document (README.md, conformance/SPEC.md) holds a generated block between a begin marker and an
end marker (HTML comments such as ``<!-- features:begin -->``). :func:`splice` replaces what lies
strictly between them and keeps the markers and everything outside them byte for byte.
"""

from __future__ import annotations

from .errors import MarkerError


def splice(text: str, begin: str, end: str, body: str, *, document: str = "the document") -> str:
    """``text`` with everything strictly between ``begin`` and ``end`` replaced by ``body``.

    For ``text = head + begin + old + end + tail`` the result is ``head + begin + body + end + tail``.
    Raises MarkerError (naming ``document``) unless each marker occurs exactly once in ``text`` and
    ``begin`` comes before ``end``, and when ``body`` itself holds a marker (the result could not be
    spliced again). A document is never guessed at: no marker is appended, no block half replaced.
    """
    if not begin or not end or begin in end or end in begin:
        raise ValueError(f"markers {begin!r} and {end!r} must be non-empty and neither may contain the other")
    found = {marker: text.count(marker) for marker in (begin, end)}
    wrong = [f"{marker} occurs {count} times" for marker, count in found.items() if count != 1]
    if wrong:
        raise MarkerError(f"{document}: {'; '.join(wrong)}, expected once each")
    start, stop = text.index(begin) + len(begin), text.index(end)
    if stop < start:
        raise MarkerError(f"{document}: {end} stands before {begin}")
    inside = [marker for marker in (begin, end) if marker in body]
    if inside:
        raise MarkerError(f"{document}: the generated block holds the marker {inside[0]}; it could not be replaced again")
    return text[:start] + body + text[stop:]
