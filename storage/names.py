"""Validation of names, aliases and tags, and parsing of refs like ``name@3``.

Names end up in file names, CLI arguments and refs, so they are checked once,
here, before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from typing import Any

from .entities import Ref
from .errors import InvalidName

MAX_NAME = 200
MAX_TAG_VALUE = 5000
LATEST = "latest"


def _check_text(kind: str, text: object, max_len: int = MAX_NAME) -> str:
    if not isinstance(text, str):
        raise InvalidName(f"{kind} must be a string, got {type(text).__name__}")
    if not text:
        raise InvalidName(f"{kind} must not be empty")
    if len(text) > max_len:
        raise InvalidName(f"{kind} is {len(text)} characters long; the limit is {max_len}")
    bad = [c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]
    if bad:
        raise InvalidName(f"{kind} {text!r} contains control character(s) {bad!r}")
    if text != text.strip():
        raise InvalidName(f"{kind} {text!r} has leading or trailing whitespace")
    return text


def check_name(name: object) -> str:
    """A skill name: no '@' (refs), no path separators (file names), no controls."""
    text = _check_text("skill name", name)
    for sep in ("@", "/", "\\"):
        if sep in text:
            raise InvalidName(f"skill name {text!r} must not contain {sep!r}")
    if text in (".", ".."):
        raise InvalidName(f"skill name {text!r} is reserved")
    return text


def check_alias(alias: object) -> str:
    """An alias: a name that cannot be mistaken for a version number or 'latest'."""
    text = check_name(alias)
    if text.isdigit():
        raise InvalidName(f"alias {text!r} is all digits and would read as a version number")
    if text == LATEST:
        raise InvalidName(f"alias {LATEST!r} is reserved for the newest version")
    return text


def check_tag(key: object, value: object) -> tuple[str, str]:
    """A tag: a short key and a string value (no silent str() of other types)."""
    k = _check_text("tag key", key)
    if not isinstance(value, str):
        raise InvalidName(f"tag {k!r} value must be a string, got {type(value).__name__}")
    if len(value) > MAX_TAG_VALUE:
        raise InvalidName(f"tag {k!r} value is longer than {MAX_TAG_VALUE} characters")
    return k, value


def parse_ref(ref: str | Ref) -> tuple[str, int | str | None]:
    """``name`` -> (name, None); ``name@3`` -> (name, 3); ``name@prod`` -> (name, 'prod')."""
    if isinstance(ref, Ref):
        return check_name(ref.name), int(ref.version)
    if not isinstance(ref, str):
        raise InvalidName(f"a ref must be a string like 'name@3', got {type(ref).__name__}")
    name, sep, sel = ref.partition("@")
    name = check_name(name)
    if not sep or sel == LATEST:
        return name, None
    if sel.isdigit():
        version = int(sel)
        if version < 1:
            raise InvalidName(f"versions start at 1, got {ref!r}")
        return name, version
    return name, check_alias(sel)


def base_id(fingerprint: dict[str, Any]) -> str:
    """A short stable hash of a base-model fingerprint (canonical JSON)."""
    blob = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_LIKE_ESCAPE = "\\"


def like_pattern(pattern: str) -> str:
    """A glob (``*``, ``?``) or plain substring as an escaped SQL LIKE pattern."""
    escaped = re.sub(r"([%_\\])", r"\\\1", pattern)
    if "*" in pattern or "?" in pattern:
        return escaped.replace("*", "%").replace("?", "_")
    return f"%{escaped}%"
