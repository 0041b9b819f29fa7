"""Registry references and names: the only strings that turn into paths inside the registry root.

A reference says which artifact version you mean:

* ``name@3``                 - version 3 of ``name`` (versions are immutable and numbered from 1)
* ``name@candidate``         - whatever version the movable alias ``candidate`` points at now
* ``name@latest``            - the newest version of ``name`` (a virtual alias, never stored)
* ``name@sha256:<hex>``      - the version of ``name`` with that content digest (a unique prefix of >= 8 hex works)
* ``sha256:<hex>``           - any artifact with that content digest
* ``name``                   - shorthand for ``name@latest`` (registry commands only; model options need the ``@``
  so a bare word can still mean a local folder or a hub id)

Names, aliases and tags are validated before they reach SQL or the file system: one path component at most,
no ``..``, bounded length, a conservative alphabet. That closes path traversal out of the root by construction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lorakit.errors import InputError

MAX_NAME = 64
MAX_TAG = 64
DIGEST_PREFIX = "sha256:"
MIN_DIGEST_PREFIX = 8
LATEST = "latest"
PRODUCTION = "production"
RESERVED_ALIASES = frozenset({LATEST})

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_HEX = re.compile(r"^[0-9a-f]+$")
_REF = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*@(?:\d+|sha256:[0-9a-f]+|[A-Za-z][A-Za-z0-9_-]*)|sha256:[0-9a-f]{8,64})$")


def validate_name(name: str, what: str = "artifact name") -> str:
    """Refuse anything that could escape the root or confuse the reference grammar."""
    if not isinstance(name, str) or not name:
        raise InputError(f"{what} is empty; use letters, digits, '.', '_' or '-' (e.g. support-adapter)")
    if len(name) > MAX_NAME:
        raise InputError(f"{what} {name[:20]!r}... is {len(name)} characters long; use at most {MAX_NAME}")
    if ".." in name or not _NAME.match(name):
        raise InputError(
            f"{what} {name!r} is not allowed; start with a letter or digit and use only letters, digits, '.', '_' "
            "and '-' (no '/', '\\', '@', spaces or '..')"
        )
    return name


def validate_alias(alias: str) -> str:
    if not isinstance(alias, str) or not alias or len(alias) > MAX_NAME or not _ALIAS.match(alias):
        raise InputError(
            f"alias {alias!r} is not allowed; start with a letter and use only letters, digits, '_' and '-' "
            f"(at most {MAX_NAME} characters, e.g. candidate)"
        )
    if alias in RESERVED_ALIASES or alias.startswith("sha256"):
        raise InputError(f"alias {alias!r} is reserved; pick another name (e.g. candidate, staging)")
    return alias


def validate_tag(tag: str) -> str:
    if not isinstance(tag, str) or not tag or len(tag) > MAX_TAG or any(c.isspace() or c in "\0\n" for c in tag):
        raise InputError(f"tag {tag!r} is not allowed; use a non-empty word of at most {MAX_TAG} characters")
    return tag


def _check_hex(text: str, ref: str) -> str:
    hexpart = text.lower()
    if not _HEX.match(hexpart) or not (MIN_DIGEST_PREFIX <= len(hexpart) <= 64):
        raise InputError(
            f"reference {ref!r} has a malformed digest; write sha256: followed by 8 to 64 hex characters"
        )
    return hexpart


@dataclass(frozen=True)
class Ref:
    """A parsed reference: a name and/or a selector (version number, alias or digest prefix)."""

    name: str | None
    version: int | None = None
    alias: str | None = None
    digest: str | None = None  # hex, possibly a prefix

    def __str__(self) -> str:
        if self.name is None:
            return f"{DIGEST_PREFIX}{self.digest}"
        if self.version is not None:
            return f"{self.name}@{self.version}"
        if self.digest is not None:
            return f"{self.name}@{DIGEST_PREFIX}{self.digest}"
        return f"{self.name}@{self.alias or LATEST}"


def parse_ref(ref: str) -> Ref:
    """Parse a reference string; every malformed form is an :class:`InputError` that shows the grammar."""
    if not isinstance(ref, str) or not ref.strip():
        raise InputError("registry reference is empty; write name@3, name@candidate or sha256:<digest>")
    ref = ref.strip()
    if ref.startswith(DIGEST_PREFIX):
        return Ref(None, digest=_check_hex(ref[len(DIGEST_PREFIX):], ref))
    name, sep, selector = ref.partition("@")
    validate_name(name)
    if not sep or selector == LATEST:
        return Ref(name, alias=LATEST)
    if selector.isdigit():
        version = int(selector)
        if version < 1:
            raise InputError(f"reference {ref!r}: versions start at 1")
        return Ref(name, version=version)
    if selector.startswith(DIGEST_PREFIX):
        return Ref(name, digest=_check_hex(selector[len(DIGEST_PREFIX):], ref))
    if not _ALIAS.match(selector):
        raise InputError(
            f"reference {ref!r} is malformed; write name@3 (version), name@candidate (alias) or name@sha256:<digest>"
        )
    return Ref(name, alias=selector)


def looks_like_ref(text: str) -> bool:
    """True for strings that can only be registry references (never a hub id, which has no '@')."""
    return bool(_REF.match(str(text).strip()))
