"""``kvtier config`` as a user runs it: a real process with the user's environment."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml


def kvtier_config(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KVTIER_", "LMCACHE_"))}
    return subprocess.run(
        [sys.executable, "-m", "kvtier.cli.main", "config", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **env},
    )


def test_the_projects_own_variables_do_not_stop_the_command() -> None:
    done = kvtier_config(KVTIER_VENV="/tmp/venv", KVTIER_MODELS_DIR="/tmp/models", KVTIER_CHUNK_SIZE="32")
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["chunk_size"] == 32


def test_a_typo_warns_and_flags_stay_strict() -> None:
    done = kvtier_config(KVTIER_CHUNCK_SIZE="32")
    assert done.returncode == 0 and "did you mean KVTIER_CHUNK_SIZE" in done.stderr
    assert kvtier_config("--chunk-size", "zero").returncode == 2
