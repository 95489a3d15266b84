"""Writing files a user could have named without ever overwriting one: temp name first, then a no-replace move.

The rule every writer of a user-nameable path follows: nothing that already exists at the target is opened for
writing or removed, unless the caller was told to replace it (`replace=True`, the CLI's `--force`). A file is
written under a hidden temporary name in the target's own folder and then hard-linked to the target name;
`os.link` fails if the name exists, so a file that appears there meanwhile (another process, a user) is never
clobbered, and a crash mid-write leaves only the hidden temporary file, never a half-written target.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import Callable, Iterable

from ground.errors import ConfigError


def temp_beside(target: Path) -> Path:
    """A hidden, unique name in the target's folder (same filesystem, so the final move is atomic)."""
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")


def existing(paths: Iterable[Path]) -> list[Path]:
    """The paths that exist (a dangling symlink counts: writing through it would still land somewhere)."""
    return [p for p in paths if os.path.lexists(p)]


def move_into_place(tmp: Path, target: Path, replace: bool = False) -> None:
    """Move the finished `tmp` to `target`; without `replace`, raise FileExistsError if `target` exists."""
    if replace:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "refusing to overwrite an existing file", str(target)) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # A filesystem without hard links: claim the name exclusively, then replace our own empty claim.
        fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.close(fd)
        os.replace(tmp, target)
        return
    os.unlink(tmp)


def write_new_file(target: str | Path, write: Callable[[Path], None], replace: bool = False) -> Path:
    """Call `write(tmp_path)`, then move the result to `target` without replacing anything (unless `replace`).

    Raises FileExistsError (before writing anything) when `target` exists and `replace` is False, or when it
    appears while writing; the temporary file is removed on every failure."""
    target = Path(target)
    if not replace and existing([target]):
        raise FileExistsError(errno.EEXIST, "refusing to overwrite an existing file", str(target))
    tmp = temp_beside(target)
    try:
        write(tmp)
        move_into_place(tmp, target, replace=replace)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return target


def write_new_text(target: str | Path, text: str, replace: bool = False) -> Path:
    return write_new_file(target, lambda tmp: tmp.write_text(text), replace=replace)


def refuse_existing_out(parser, outs: list[str], force: bool) -> None:
    """Stop a script (the benchmarks) before it measures anything when an --out file (a committed result, say)
    exists and --force was not given; `parser` is its argparse parser, whose error exits with code 2."""
    there = existing(Path(o) for o in outs)
    if there and not force:
        parser.error(f"{' and '.join(map(str, there))} already exist(s); pass --force to replace, or choose "
                     "another --out")


# What registry/local.py writes at a local registry's root ({"format": N}); named here, on the ground floor, so
# that every writer of a user-named output folder can refuse a registry without importing the registry.
REGISTRY_MARKER = "registry.json"


def registry_root_of(folder: str | Path) -> Path | None:
    """The local registry that `folder` is or lies inside (the nearest of it and its parents holding
    REGISTRY_MARKER), else None. `folder` need not exist; symlinks are followed, so a link to a registry is one."""
    path = Path(folder).expanduser().absolute().resolve()
    for candidate in (path, *path.parents):
        if (candidate / REGISTRY_MARKER).is_file():
            return candidate
    return None


def refuse_registry_folder(folder: str | Path, what: str) -> None:
    """Raise ConfigError when `folder` (an output folder, named by `what`, e.g. "--out-dir") is a registry or
    lies inside one: a registry holds only its own files, and its cleanup judges everything under its root."""
    root = registry_root_of(folder)
    if root is None:
        return
    inside = "is" if root == Path(folder).expanduser().absolute().resolve() else "lies inside"
    raise ConfigError(f"{what} `{folder}` {inside} the adapter registry at `{root}` (it holds {REGISTRY_MARKER}); "
                      "outputs, logs and checkpoints never go into a registry. Choose a folder outside it; "
                      "`pipeline registry publish` is how an adapter enters the registry.")
