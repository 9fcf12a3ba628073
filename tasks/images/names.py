"""Local file names as uris: a Parquet string must be valid UTF-8, and a POSIX file name is any bytes. A name that
is not valid UTF-8 (or holds a backslash) is written with escapes, `\\xNN` for each byte that is not UTF-8 and
`\\\\` for a backslash, and read back to the same bytes, so such a file is listed, read and classified like any other."""

from __future__ import annotations

import re

_ESCAPE = re.compile(r"\\\\|\\x([89a-f][0-9a-f])")  # backslashreplace writes bytes 0x80-0xff as \xNN


def uri_of_path(path: str) -> str:
    """`path` (as os.scandir gives it: undecodable bytes as surrogate escapes) as a valid UTF-8 string; unchanged
    when it is valid UTF-8 without a backslash, as nearly every name is."""
    if "\\" not in path and _is_utf8(path):
        return path
    return path.replace("\\", "\\\\").encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def path_of_uri(uri: str) -> str:
    """The path `uri_of_path` was given (surrogate escapes where the name is not UTF-8), for os.open and os.stat."""
    if "\\" not in uri:
        return uri
    return _ESCAPE.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)) if m.group(1) else "\\", uri)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
