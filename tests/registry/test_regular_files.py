"""A registry file replaced by a FIFO (or another non-regular file) is refused at once, by name, never waited on.

Before the fix, opening a FIFO for reading blocked until a writer came: `verify` and the server's first load of the
version hung with no answer. The real CLI runs in a subprocess with a timeout; the server's verification
(serve.verified.VerifiedCache, what `pipeline serve` calls before a first load) runs in a thread with one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from registry import open_registry
from tests.synthetic_lora import write_lora

DEADLINE_S = 60  # generous for a loaded 2-core machine; a hang is forever


def _cli(*args):
    return subprocess.run([sys.executable, "-c", "from pipeline.cli import main_entry; main_entry()", *args],
                          capture_output=True, text=True, timeout=DEADLINE_S)


def _fifo_in_place_of(path):
    path.unlink()
    os.mkfifo(path)


def _release(path):
    """Give a reader stuck on the FIFO (old code) an end of file, so no thread stays blocked after the test."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass


@pytest.fixture
def reg(tmp_path):
    reg = open_registry(str(tmp_path / "store"), mirror_mlflow=False)
    lora = write_lora(tmp_path / "lora", rank=4)
    reg.publish(lora, "a", alias="prod")
    reg.publish(lora, "a")
    return reg


@pytest.mark.parametrize("fname", ["adapter_model.safetensors", "manifest.json", "metadata.json"])
def test_cli_refuses_a_fifo_by_name(reg, fname):
    fifo = reg.resolve("a@1").path / fname
    _fifo_in_place_of(fifo)
    try:
        verify = _cli("registry", "--registry", reg.uri, "verify", "a@1")
        export = _cli("registry", "--registry", reg.uri, "export", "a@1", "--out", str(fifo.parents[5] / "out"))
    finally:
        _release(fifo)
    for proc in (verify, export):
        text = proc.stdout + proc.stderr
        assert proc.returncode == 2 and "FIFO" in text and fname in text and "Traceback" not in text, text
    assert "a@2" not in verify.stdout + verify.stderr  # the other version is not involved


def test_alias_table_as_fifo_is_refused(reg):
    fifo = reg.store.root / "adapters" / "a" / "aliases.json"
    _fifo_in_place_of(fifo)
    try:
        proc = _cli("registry", "--registry", reg.uri, "show", "a@prod")
    finally:
        _release(fifo)
    assert proc.returncode == 2 and "FIFO" in proc.stderr and "aliases.json" in proc.stderr, proc.stderr


@pytest.mark.parametrize("fname", ["adapter_model.safetensors", "manifest.json"])
def test_server_first_load_refuses_a_fifo_fast(reg, tmp_path, fname):
    from serve.verified import CorruptVersionError, VerifiedCache

    av = reg.resolve("a@1")
    fifo = av.path / fname
    _fifo_in_place_of(fifo)
    cache, outcome = VerifiedCache(tmp_path / "run" / "verified"), {}

    def first_load():
        try:
            outcome["path"] = cache.path_for(av.ref, av.path)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    worker = threading.Thread(target=first_load, daemon=True)
    worker.start()
    worker.join(DEADLINE_S)
    hung = worker.is_alive()
    _release(fifo)
    worker.join(5)
    assert not hung, f"the first load of {av.ref} blocked on a FIFO for {DEADLINE_S} s"
    assert isinstance(outcome.get("error"), CorruptVersionError), outcome
    assert "a@1 is refused" in str(outcome["error"]) and "FIFO" in str(outcome["error"])
