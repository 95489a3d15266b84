"""Reading YAML that may be hostile: size, nesting and alias expansion are bounded before anything is built.

A config file (`-c FILE`) and the value of every `key=value` override are YAML, and YAML can describe far more
than it spells: nine aliases of nine aliases of ... (a "billion laughs") expand to millions of nodes from a few
hundred bytes, and an alias inside its own anchor (`&x {a: *x}`) to an endless one. PyYAML expands both while
building Python objects, and the loader's recursive merges then run out of memory, time or stack.

So the text is first read as PyYAML's event stream (a flat sequence, produced without recursion) and measured:
the bytes, the nodes the document stands for once every alias is expanded, the deepest nesting (through
aliases too), and whether an alias points into its own anchor. Only a document inside every limit is then
loaded. The limits are far above any real config (the schema nests 4 levels; a generous config is a few
hundred nodes), so they refuse only what no config needs.
"""

from __future__ import annotations

from typing import Any

import yaml

from ground.errors import ConfigError

MAX_BYTES = 1 << 20  # a config file; the embedded demo is ~2 KB
MAX_NODES = 100_000  # scalars and collections, counting each alias as the whole node it repeats
MAX_DEPTH = 32  # nested collections, counting those reached through aliases
MAX_KEY_SEGMENTS = 32  # parts of one dotted override key (the deepest schema key has 4)

_OPEN = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_CLOSE = (yaml.MappingEndEvent, yaml.SequenceEndEvent)


def _refuse(source: str, what: str, limit: str) -> ConfigError:
    return ConfigError(f"{source} is refused: {what} (the limit is {limit}, far above what any config needs). "
                       "Write the values out plainly; an alias (*name) may repeat a small value, not build a "
                       "large or endless one.")


def _measure(text: str, source: str) -> None:
    """Walk the event stream once; raise ConfigError at the first limit passed."""
    nodes = 0
    # Per open collection: [node count when it opened, deepest level below it so far, its anchor].
    stack: list[list[Any]] = []
    done: dict[str, tuple[int, int]] = {}  # anchor -> (nodes it stands for, levels it nests)
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            if event.anchor not in done:  # its anchor is still open: the alias is inside what it names
                if any(frame[2] == event.anchor for frame in stack):
                    raise _refuse(source, f"the alias *{event.anchor} refers to the node that holds it, so it "
                                          "never ends", "no alias inside its own anchor")
                continue  # an undefined alias: yaml.load says so, with its line
            size, depth = done[event.anchor]
        elif isinstance(event, _OPEN):
            stack.append([nodes, 0, event.anchor])
            nodes += 1
            if len(stack) > MAX_DEPTH:
                raise _refuse(source, f"it nests collections more than {MAX_DEPTH} levels deep",
                              f"{MAX_DEPTH} levels")
            continue
        elif isinstance(event, _CLOSE):
            start, below, anchor = stack.pop()
            size, depth = nodes - start, below + 1
            if anchor is not None:
                done[anchor] = (size, depth)
            if stack:
                stack[-1][1] = max(stack[-1][1], depth)
            continue
        elif isinstance(event, yaml.ScalarEvent):
            size, depth = 1, 0
            if event.anchor is not None:
                done[event.anchor] = (size, depth)
            nodes += 1
        else:  # stream and document markers
            continue
        if isinstance(event, yaml.AliasEvent):
            nodes += size
            if stack:
                stack[-1][1] = max(stack[-1][1], depth)
            if len(stack) + depth > MAX_DEPTH:
                raise _refuse(source, f"through the alias *{event.anchor} it nests collections more than "
                                      f"{MAX_DEPTH} levels deep", f"{MAX_DEPTH} levels")
        if nodes > MAX_NODES:
            raise _refuse(source, f"it stands for more than {MAX_NODES:,} values once its aliases are expanded",
                          f"{MAX_NODES:,} values")


def load_bounded(text: str, source: str) -> Any:
    """`yaml.safe_load(text)` for a document inside MAX_BYTES, MAX_NODES and MAX_DEPTH; else ConfigError
    naming `source` (e.g. "Config file `c.yaml`") and the limit. A syntax error raises yaml.YAMLError."""
    if len(text.encode()) > MAX_BYTES:
        raise _refuse(source, "it is larger than the limit", f"{MAX_BYTES:,} bytes")
    _measure(text, source)
    return yaml.safe_load(text)


def read_bounded(path, source: str) -> str:
    """A file's text, refusing one larger than MAX_BYTES without reading more than that."""
    with open(path, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise _refuse(source, "it is larger than the limit", f"{MAX_BYTES:,} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None


def check_key_segments(key: str, arg: str) -> None:
    parts = key.count(".") + 1
    if parts > MAX_KEY_SEGMENTS:
        shown = arg if len(arg) <= 80 else f"{arg[:80]}... ({len(arg)} characters)"
        raise ConfigError(f"Override `{shown}` has a key of {parts} dotted parts; keys have at most "
                          f"{MAX_KEY_SEGMENTS} (the schema's deepest has 4).")
