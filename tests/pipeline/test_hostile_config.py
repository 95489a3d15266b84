"""Hostile YAML in a config file or an override is refused by name, fast, in bounded memory, without a traceback.

Each input below is a few hundred bytes that PyYAML would expand into millions of nodes, an endless structure or
a nesting deeper than Python's stack: before config/yaml_limits.py they ran for minutes and gigabytes, or ended
in a RecursionError traceback."""

import resource
import subprocess
import sys
import time

import pytest

from config import load_config
from config.yaml_limits import MAX_BYTES, MAX_DEPTH, MAX_KEY_SEGMENTS, MAX_NODES
from ground.errors import ConfigError

MEMORY_LIMIT = 1 << 30  # address space of the refusing process: the refusal needs a small part of it
TIME_LIMIT_S = 30  # the refusal itself takes well under a second; the rest is the interpreter starting


def _bomb(form: str) -> str:
    """7 levels of 9 aliases (9**7 = 4.8 million leaves) under data.generate_kwargs, as lists or as mappings."""
    if form == "list":
        rows = ["    l0: &l0 [x, x, x, x, x, x, x, x, x]"]
        rows += [f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 8)]
    else:
        rows = ["    l0: &l0 {" + ", ".join(f"k{j}: x" for j in range(9)) + "}"]
        rows += [f"    l{i}: &l{i} {{" + ", ".join(f"k{j}: *l{i - 1}" for j in range(9)) + "}" for i in range(1, 8)]
    return "data:\n  generate_kwargs:\n" + "\n".join(rows) + "\n"


HOSTILE_FILES = {
    "alias-bomb-list": (_bomb("list"), f"more than {MAX_NODES:,} values"),
    "alias-bomb-dict": (_bomb("dict"), f"more than {MAX_NODES:,} values"),
    "recursive-alias": ("data:\n  generate_kwargs: &x {a: *x}\n", r"alias \*x refers to the node that holds it"),
    "recursive-alias-list": ("data:\n  generate_kwargs:\n    a: &y [1, [2, *y]]\n", r"alias \*y refers"),
    "deep-nesting": ("data:\n  generate_kwargs:\n    a: " + "[" * 10_000 + "]" * 10_000 + "\n",
                     f"more than {MAX_DEPTH} levels deep"),
    "deep-through-aliases": ("data:\n  generate_kwargs:\n    a: &a " + "[" * 20 + "]" * 20 + "\n    b: " + "[" * 20
                             + "*a" + "]" * 20 + "\n", f"through the alias \\*a .* more than {MAX_DEPTH} levels"),
    "oversized-file": ("data:\n  generate_kwargs:\n    a: '" + "x" * (MAX_BYTES + 10) + "'\n", f"{MAX_BYTES:,} bytes"),
    "reference-bomb": ("data:\n  generate_kwargs:\n    a: '" + "x" * 400_000 + "'\n    b: '"
                       + "${data.generate_kwargs.a}" * 10 + "'\n", r"references .* expand to more than"),
}
LONG_KEY = "data.generate_kwargs." + ".".join(f"k{i}" for i in range(10_000))
HOSTILE_OVERRIDES = {
    "10000-segment-key": (f"{LONG_KEY}=1", f"at most {MAX_KEY_SEGMENTS}"),
    "alias-bomb-value": ("data.generate_kwargs.x=[&a [1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], "
                         "&c [*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c], "
                         "&e [*d,*d,*d,*d,*d,*d,*d,*d,*d], &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]]",
                         f"more than {MAX_NODES:,} values"),
    "recursive-alias-value": ("data.generate_kwargs.x=&x {a: *x}", r"alias \*x refers"),
}


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _pipeline(*args, cwd):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", "from pipeline.cli import main_entry; main_entry()", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=TIME_LIMIT_S, preexec_fn=_limit_memory)
    return proc, time.monotonic() - t0


@pytest.mark.parametrize("name", sorted(HOSTILE_FILES))
def test_hostile_config_file_is_refused_by_load_config(tmp_path, name):
    text, pattern = HOSTILE_FILES[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=pattern) as refused:
        load_config(path)
    assert time.monotonic() - t0 < 5
    if name != "reference-bomb":  # refused after the layers are merged: it names the reference instead
        assert str(path) in str(refused.value)


@pytest.mark.parametrize("name", sorted(HOSTILE_OVERRIDES))
def test_hostile_override_is_refused_by_load_config(name):
    override, pattern = HOSTILE_OVERRIDES[name]
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


@pytest.mark.parametrize("name", ["alias-bomb-list", "alias-bomb-dict", "recursive-alias", "deep-nesting"])
def test_cli_refuses_hostile_file_in_bounded_time_and_memory(tmp_path, name):
    text, pattern = HOSTILE_FILES[name]
    (tmp_path / "hostile.yaml").write_text(text)
    proc, seconds = _pipeline("config", "show", "-c", "hostile.yaml", cwd=tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "RecursionError" not in proc.stderr
    assert "hostile.yaml" in proc.stderr and "limit is" in proc.stderr
    assert proc.stderr.count("error:") == 1 and not proc.stdout


def test_cli_refuses_a_10000_segment_key_without_a_traceback(tmp_path):
    proc, _ = _pipeline("config", "show", HOSTILE_OVERRIDES["10000-segment-key"][0], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"at most {MAX_KEY_SEGMENTS}" in proc.stderr and len(proc.stderr) < 1000


def test_ordinary_anchors_and_deep_enough_values_still_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  generate_kwargs:\n    ops: &ops ['+', '-']\n    again: *ops\n    nested: "
                    + "[" * 10 + "1" + "]" * 10 + "\n")
    cfg = load_config(path, ["data.generate_kwargs.more=[1, [2, [3]]]"])
    assert cfg.data.generate_kwargs["again"] == ["+", "-"]
    assert cfg.data.generate_kwargs["more"] == [1, [2, [3]]]


@pytest.mark.parametrize("key", ["a!b", "k" * 300, "a//b", "a/./b"])
def test_a_free_form_key_mlflow_cannot_record_is_refused_at_load(tmp_path, key):
    """Every config key becomes an MLflow param; MLflow refused the run's whole batch for one such key, with a
    traceback, after the run directory existed."""
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  generate_kwargs:\n    '{key}': 1\n")
    with pytest.raises(ConfigError, match=r"cannot be recorded as an MLflow param.*c\.yaml|c\.yaml.*MLflow param"):
        load_config(path)
