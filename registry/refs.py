"""Names, aliases and references, validated at the boundary before they reach the filesystem.

A reference picks one adapter version:

    NAME            the latest version of NAME (also NAME@latest)
    NAME@7          version 7
    NAME@prod       whatever version the alias `prod` points at now
    models:/NAME/7, models:/NAME@prod   MLflow's spelling of the same

Names and aliases become directory and file names, so they match a strict pattern: no path separators, no
`..`, no leading dot, at most 128 (names) or 64 (aliases) characters. An alias must start with a letter so it
can never be mistaken for a version number; `latest` and `v<digits>` are reserved (the first means "newest
version" here, both are reserved by MLflow's registry, which we mirror).
"""

from __future__ import annotations

import re

from ground.errors import RegistryError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ALIAS_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
RESERVED_ALIAS_RE = re.compile(r"latest|[vV]\d+")
LATEST = "latest"
VERSION_RE = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() and int() also take "१" or "٣" as digits
SHOWN_CHARS = 80
MAX_VERSION_DIGITS = 18  # past int64's range no store could hold the version; int() refuses 4,300+ digits anyway


def shown(value) -> str:
    """`repr(value)` cut to SHOWN_CHARS characters for messages: a 1 MB name must not come back as a 1 MB error."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} characters)"


def check_name(name: str, what: str = "adapter name") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise RegistryError(
            f"Invalid {what} {shown(name)}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or "
            "digit, without '..' or path separators (e.g. `arithmetic-grpo`)."
        )
    return name


def check_alias(alias: str) -> str:
    if not isinstance(alias, str) or not ALIAS_RE.fullmatch(alias):
        raise RegistryError(
            f"Invalid alias {shown(alias)}: use 1-64 letters, digits, '_' or '-', starting with a letter "
            "(e.g. `prod`, `latest-good`)."
        )
    if RESERVED_ALIAS_RE.fullmatch(alias):
        raise RegistryError(
            f"Alias {alias!r} is reserved (`latest` always means the newest version; `v<N>` is reserved by MLflow's "
            "registry). Pick another alias, e.g. `prod` or `candidate`."
        )
    return alias


def _version_number(digits: str) -> int:
    if len(digits.lstrip("0")) > MAX_VERSION_DIGITS:
        raise RegistryError(f"Invalid version {shown(digits)}: more than {MAX_VERSION_DIGITS} digits; no registry "
                            "holds that many versions (write the version number `registry list` shows).")
    return int(digits, 10)


def check_version(version) -> int:
    if isinstance(version, bool) or not isinstance(version, int):
        if not VERSION_RE.fullmatch(str(version)):
            raise RegistryError(f"Invalid version {shown(version)}: versions are positive integers written in ASCII "
                                "digits (1, 2, 3, ...).")
        version = _version_number(str(version))
    if version < 1:
        raise RegistryError(f"Invalid version {version}: versions are positive integers (1, 2, 3, ...).")
    return version


def parse_ref(ref: str) -> tuple[str, int | None, str | None]:
    """`NAME`, `NAME@7`, `NAME@prod` (or `models:/NAME/7`, `models:/NAME@prod`) -> (name, version, alias).

    At most one of version and alias is set; both None means the latest version.
    """
    if not isinstance(ref, str) or not ref:
        raise RegistryError(f"Invalid adapter reference {shown(ref)}: write NAME, NAME@VERSION or NAME@ALIAS.")
    text = ref
    if text.startswith("models:/"):
        text = text[len("models:/"):]
        if "/" in text and "@" not in text:
            text = text.replace("/", "@", 1)
    name, sep, selector = text.partition("@")
    if sep and not selector:
        raise RegistryError(f"Invalid adapter reference {shown(ref)}: nothing after '@'; write NAME@VERSION or NAME@ALIAS.")
    check_name(name)
    if not sep or selector == LATEST:
        return name, None, None
    if VERSION_RE.fullmatch(selector):
        return name, check_version(_version_number(selector)), None
    if selector.isdigit():
        raise RegistryError(f"Invalid version {shown(selector)} in {shown(ref)}: write versions in ASCII digits 0-9 "
                            "(e.g. NAME@1).")
    return name, None, check_alias(selector)


def format_versions(versions: list[int]) -> str:
    """[1, 2, 3, 5, 7, 8] -> '1-3, 5, 7-8' so that an error message stays short at 1,000 versions."""
    if not versions:
        return "none"
    parts, start, prev = [], versions[0], versions[0]
    for v in versions[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(parts)
