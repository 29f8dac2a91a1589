"""Client file names made safe: the legacy answer's stem and the input bucket's key are never a path.

The legacy contract echoes the upload's file name (``test_000.jpg`` -> ``test_000:Paul``) and, in queue mode,
stores the upload under it. A name is whatever the client wrote in its multipart header, so it may carry
directories (``../../etc/passwd``, ``C:\\photos\\a.jpg``), control characters, or hundreds of characters.
"""

from __future__ import annotations

import posixpath
import unicodedata

#: Longer names are cut (keeping the extension): S3 keys allow 1,024 bytes, most file systems 255.
MAX_NAME_BYTES = 200
#: What a name with nothing usable left becomes.
FALLBACK_NAME = "upload"


def safe_filename(name: str | None) -> str:
    """The last path component of ``name``, without control characters, at most ``MAX_NAME_BYTES`` bytes."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if unicodedata.category(ch)[0] != "C").strip()
    if base in ("", ".", ".."):
        return FALLBACK_NAME
    if len(base.encode()) > MAX_NAME_BYTES:
        stem, extension = posixpath.splitext(base)
        if len(extension.encode()) > 16:
            stem, extension = base, ""
        budget = MAX_NAME_BYTES - len(extension.encode())
        stem = stem.encode()[:budget].decode(errors="ignore").rstrip()  # a key never ends in a cut-off space
        base = stem + extension
    return base or FALLBACK_NAME


def safe_stem(name: str | None) -> str:
    """``safe_filename(name)`` without its extension: what the legacy answer starts with."""
    return posixpath.splitext(safe_filename(name))[0] or FALLBACK_NAME
