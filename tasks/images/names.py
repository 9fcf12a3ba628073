"""Uris as a manifest holds them. Local file names: a Parquet string must be valid UTF-8, and a POSIX file name is
any bytes. A name that is not valid UTF-8 (or holds a backslash) is written with escapes, `\\xNN` for each byte
that is not UTF-8 and `\\\\` for a backslash, and read back to the same bytes, so such a file is listed, read and
classified like any other. A manifest row without a uri gets a stand-in that names the row, so it can be an
error row of its own."""

from __future__ import annotations

import re

OBJECT_SCHEMES = frozenset({"s3"})  # the stores a manifest's uris are read from; any other scheme is refused per row
# Sorts after every local path and s3:// uri (so a shard's first uri, which picks how it is read, is a real one
# whenever it has one); no file is ever looked for under this name.
_MISSING_URI = re.compile(r"~manifest row (\d+): (null|empty) uri")
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


def missing_uri(row: int, what: str) -> str:
    """The stand-in uri of manifest row `row` (0-based) whose uri is `what` ("null" or "empty")."""
    return f"~manifest row {row}: {what} uri"


def uri_refusal(uri: str) -> tuple[str, str] | None:
    """("invalid_uri" or "unsupported", why) for a uri no read is tried on, else None."""
    if m := _MISSING_URI.fullmatch(uri):
        return "invalid_uri", f"the manifest's uri in row {m.group(1)} (0-based) is {m.group(2)}"
    if "://" in uri and (scheme := uri.split("://", 1)[0].lower()) not in OBJECT_SCHEMES:
        allowed = ", ".join(f"{s}://" for s in sorted(OBJECT_SCHEMES))
        return "unsupported", f"uri scheme {scheme!r} is not read; allowed: local paths and {allowed}"
    return None
