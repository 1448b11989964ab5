"""training.allocator (zhlora/allocator.py): the entry points start again with jemalloc preloaded."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zhlora import allocator
from zhlora.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
# What an entry point does first: take the allocator, then report what it runs with.
SCRIPT = "import sys; from zhlora import allocator; allocator.use(sys.argv[1]); print(allocator.active(), sys.argv[2])"


def run_entry(choice: str, env: dict) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.MARK, "ZHLORA_JEMALLOC")}
    return subprocess.run([sys.executable, "-c", SCRIPT, choice, "kept"], capture_output=True, text=True,
                          env={**clean, "PYTHONPATH": str(REPO), **env}, timeout=60)


def test_a_wrong_value_names_the_choices():
    with pytest.raises(ConfigError, match="training.allocator.*auto, system or jemalloc"):
        load_config(None, ["training.allocator=tcmalloc"])


def test_system_never_starts_again():
    done = run_entry("system", {})
    assert done.returncode == 0 and done.stdout.split() == ["system", "kept"]
    assert "starting again" not in done.stdout


def test_jemalloc_asked_for_but_missing_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(allocator.MARK, raising=False)
    monkeypatch.delenv("ZHLORA_JEMALLOC", raising=False)
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: None)
    with pytest.raises(ConfigError, match="apt install libjemalloc2.*training.allocator=system"):
        allocator.use("jemalloc")
    allocator.use("auto")  # auto goes on with the system allocator (it says so)


@pytest.mark.skipif(allocator.find_jemalloc() is None, reason="jemalloc is not installed here")
@pytest.mark.parametrize("choice", ["auto", "jemalloc"])
def test_the_process_starts_again_once_with_jemalloc_and_keeps_its_arguments(choice):
    done = run_entry(choice, {})
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("starting again with jemalloc") == 1  # once: the new process does not loop
    assert done.stdout.split()[-2:] == ["jemalloc", "kept"]
