"""The fuzz suite (fuzz/), briefly and seeded, inside `make test`: each target's run of a few
hundred inputs mutated from its valid seed must end without a finding (an exception other than
LlamascopeError, an input over the time limit, memory past the limit). For as long as you like:
`.venv/bin/python fuzz/run.py all --seconds 600` (docs/security.md)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

ROOT = Path(__file__).resolve().parents[1]
RUNS = 150


@pytest.mark.parametrize("target", ["gguf", "safetensors", "config", "tokenizer", "template"])
def test_a_short_seeded_fuzz_run_finds_nothing(target, tmp_path):
    command = [sys.executable, str(ROOT / "fuzz" / "run.py"), target, "--runs", str(RUNS), "--seed", "1"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"Done {RUNS} runs" in proc.stderr or "stat::number_of_executed_units" in proc.stderr


def test_the_harness_lets_any_other_exception_through():
    """What makes a finding: the rule lets a LlamascopeError pass and nothing else (so the suite
    can fail)."""
    spec = importlib.util.spec_from_file_location("fuzz_targets", ROOT / "fuzz" / "targets.py")
    targets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(targets)

    def refuses(data: bytes) -> None:
        raise targets.LlamascopeError("refused by name")

    def breaks(data: bytes) -> None:
        raise KeyError("a traceback a user would see")

    targets.held_to_the_rule(refuses)(b"x")
    with pytest.raises(KeyError):
        targets.held_to_the_rule(breaks)(b"x")
