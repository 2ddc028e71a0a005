"""Read a JSON file from an untrusted source: every failure becomes one typed, one-line error.

json.loads alone lets RecursionError (deep nesting), ValueError (integers past Python's digit
limit), IsADirectoryError and UnicodeDecodeError escape; callers get their own error class.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import FileFormatError, LoraRefError
from .inputs import open_regular

#: JSON descriptions (configs, trees, cases, indexes) are small; refuse anything larger unread.
MAX_JSON_BYTES = 64 * 1024 * 1024


def read_json(
    path: str | Path,
    *,
    error: type[LoraRefError] = FileFormatError,
    what: str = "JSON file",
    max_bytes: int = MAX_JSON_BYTES,
) -> Any:
    """Parse ``path`` as UTF-8 JSON; raise ``error`` naming the file for anything unreadable."""
    path = Path(path)
    try:
        with open_regular(path, what) as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > max_bytes:
                raise error(f"{path}: {size} bytes exceeds the {max_bytes}-byte limit for a {what}")
            text = handle.read(max_bytes + 1).decode("utf-8")
    except FileFormatError as exc:  # from open_regular: missing, a directory, a FIFO or device
        if "no such file" in str(exc):
            raise error(f"{path}: missing {what}") from None
        if isinstance(exc, error):
            raise
        raise error(str(exc)) from None
    except UnicodeDecodeError:
        raise error(f"{path}: {what} is not UTF-8 text") from None
    except (OSError, ValueError) as exc:  # a directory, no permission, an embedded NUL in the path
        raise error(f"{path}: cannot read the {what} ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, too-long integers, deep nesting
        raise error(f"{path}: invalid JSON in the {what} ({type(exc).__name__}: {str(exc)[:200]})") from None
