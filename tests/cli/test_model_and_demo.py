"""``kvtier model`` and ``kvtier demo`` as a user runs them: real processes, the real model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from kvtier.integrations.models import model_path, prepare_model


def kvtier(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvtier.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_model_path_points_at_the_prepared_model() -> None:
    prepare_model()
    done = kvtier("model", "path")
    assert done.returncode == 0
    assert done.stdout.strip() == str(model_path())
    assert (model_path() / "config.json").is_file()


def test_unknown_model_is_rejected() -> None:
    done = kvtier("model", "prepare", "gpt-17")
    assert done.returncode == 2
    assert "invalid choice" in done.stderr


@pytest.mark.slow
def test_demo_stores_then_retrieves_and_ttft_drops() -> None:
    done = kvtier("demo", "--context-tokens", "400", "--max-new-tokens", "4")
    assert done.returncode == 0, done.stdout + done.stderr
    logs, out = done.stderr, done.stdout
    assert "Stored " in logs and "Retrieved 384 of" in logs  # the engine's own log lines
    assert "Request 1" in out and "No cached prefix" in out
    assert "Request 2" in out and "Retrieved 384 tokens (384 from memory)" in out
    assert "TTFT" in out.splitlines()[-1]
