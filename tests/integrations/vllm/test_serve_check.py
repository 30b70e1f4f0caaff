"""The check users are told to run (``examples/vllm_serve_check.sh``): a real ``vllm serve`` with the connector
answers two ``/v1/completions`` requests sharing a prefix; the first stores, the second retrieves, and both
texts equal the same requests computed from scratch (under cache salts of their own; temperature 0)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier.integrations.models import is_prepared
from servers import free_port

pytest.importorskip("vllm", reason="vLLM is not installed")
SCRIPT = Path(__file__).parents[3] / "examples" / "vllm_serve_check.sh"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not is_prepared(), reason="the model is not prepared: run `kvtier model prepare`")
@pytest.mark.skipif(shutil.which("curl") is None, reason="the check uses curl")
def test_vllm_serve_check_passes() -> None:
    env = {**os.environ, "PYTHON": sys.executable, "PORT": str(free_port())}
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=560, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS" in done.stdout
    assert "Retrieved" in done.stdout  # the connector's per-request lines are echoed from the vLLM log
