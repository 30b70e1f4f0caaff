"""KVTierConnector in the real vLLM engine (SmolLM2-135M fp32 on the CPU), one engine per driver process.

Each engine start costs ~30 s, so every driver run checks several things in phases (see driver.py). Greedy
output with kvtier must equal the output of vLLM without it, whether the KV was computed, loaded from memory,
disk or a kvtier server, partly lost, or not available at all.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvtier.integrations.models import is_prepared, model_path
from servers import ServerProcess

pytest.importorskip("vllm", reason="vLLM is not installed")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not is_prepared(), reason="the model is not prepared: run `kvtier model prepare`"),
]

DRIVER = Path(__file__).with_name("driver.py")
CHUNK = 128  # = vLLM's CPU block size
NUM_BLOCKS = 20  # 2,560 tokens of KV: the preemption phase needs more than that
MAX_TOKENS = 4


WORDS = [
    "river",
    "castle",
    "engine",
    "garden",
    "winter",
    "copper",
    "violin",
    "harbor",
    "lantern",
    "meadow",
    "falcon",
    "orchard",
]


@functools.cache
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path()))


def prompt(length: int, seed: int) -> list[int]:
    """``length`` token ids of English-like text (peaked next-token distributions: greedy decoding is stable
    against the last-bit differences of batching, where random token ids often give near ties)."""
    rng = random.Random(seed)
    sentences = []
    for i in range(length):  # more than enough text
        a, b, c = rng.sample(WORDS, 3)
        sentences.append(f"Note {i}: the {a} near the {b} was older than the {c}.")
    return tokenizer()(" ".join(sentences))["input_ids"][:length]


P700 = prompt(700, 1)  # 5 chunks + 60 tokens: not a multiple of the chunk or block size
P512 = prompt(512, 2)  # exactly 4 chunks: a full hit must still leave the last token to vLLM
P300 = prompt(300, 3)
PREEMPT = [prompt(760, 10 + i) for i in range(3)]  # 3 x 6 blocks; growing to a 7th block needs 21 > 20
GENERATE = [P700, P512, P300]


def gen(name: str, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    return {"name": name, "prompts": prompts, "max_tokens": max_tokens}


def spec(phases: list[dict[str, Any]], extra: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    connector = None if extra is None else {"kv_role": kw.pop("kv_role", "kv_both"), "extra": extra}
    return {"connector": connector, "num_blocks": NUM_BLOCKS, "max_model_len": 2048, "phases": phases, **kw}


class Run:
    """One driver process: its phase results by name and its whole log."""

    def __init__(self, results: dict[str, dict[str, Any]], log: str) -> None:
        self.results = results
        self.log = log

    def tokens(self, phase: str) -> list[list[int]]:
        return self.results[phase]["tokens"]

    def retrieved(self) -> list[tuple[int, int]]:
        """(loaded, promised-or-prompt) of every "Retrieved" line the connector logged."""
        return [(int(a), int(b)) for a, b in re.findall(r"Retrieved (\d+) of (\d+) prompt tokens", self.log)]


def run_driver(tmp_path: Path, spec_: dict[str, Any], on_pause: Callable[[str], None] | None = None) -> Run:
    path = tmp_path / f"spec-{os.getpid()}-{len(list(tmp_path.glob('spec-*')))}.json"
    path.write_text(json.dumps(spec_))
    proc = subprocess.Popen(
        [sys.executable, str(DRIVER), str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    assert proc.stdin is not None and proc.stdout is not None
    results: dict[str, dict[str, Any]] = {}
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith('{"pause"'):
            assert on_pause is not None
            on_pause(json.loads(line)["pause"])
            proc.stdin.write("\n")
            proc.stdin.flush()
        elif line.startswith('{"phase"'):
            result = json.loads(line)
            results[result.pop("phase")] = result
    log = "".join(lines)
    assert proc.wait() == 0, log[-5000:]
    return Run(results, log)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """vLLM without a connector: the expected greedy tokens."""
    tmp = tmp_path_factory.mktemp("reference")
    return run_driver(tmp, spec([gen("generate", GENERATE), gen("preempt", PREEMPT, 20), *CONVERSATION]))


OFF_STEP = {"async_store": True, "enable_async_loading": True}
# Two turns: a 370-token prompt and a 20-token answer, then the prompt + the answer + a new question. With
# save_decode_cache the answer's KV is stored when the first turn ends: the chunk [256, 384) the prompt alone
# could not fill.
CONVERSATION = [gen("turn-1", [prompt(370, 4)], 20), {"name": "turn-2", "follow_up": "turn-1", "append": P512[:20]}]


def assert_off_step(run: Run) -> None:
    """Loads (and, when something was new, stores) ran off vLLM's step, and nothing is held once idle."""
    assert re.search(r"Retrieved [1-9]\d* of \d+ prompt tokens .* \(off the step\)", run.log), run.retrieved()
    stores = re.findall(r"request \S+: Stored [1-9]\d* tokens .*", run.log)  # the connector's lines
    assert all(re.search(r"\(off the step; [\d.]+ ms in it\)$", line) for line in stores), stores
    assert run.results["state"] == {"hits": 0, "admitted": 0, "requests": 0}


def in_process_extra(disk: Path) -> dict[str, Any]:
    return {"chunk_size": CHUNK, "max_local_cpu_size": 0.5, "local_disk": str(disk), "max_local_disk_size": 1}


def test_in_process_store_hit_abort_preempt_then_restart_with_a_corrupt_chunk(reference: Run, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    first = run_driver(
        tmp_path,
        spec(
            [
                gen("store", GENERATE),  # three concurrent requests in one generate call
                gen("hit", GENERATE),  # same process: from the memory tier
                {"name": "abort", "abort": [prompt(900, 20), P700], "steps": 1},
                gen("preempt", PREEMPT, 20),
                *CONVERSATION,  # save_decode_cache: what turn-1 generates is stored when it ends
                {"name": "state", "state": True},
            ],
            {**in_process_extra(disk), "save_decode_cache": True},
        ),
    )
    assert first.tokens("store") == reference.tokens("generate")
    assert first.tokens("hit") == reference.tokens("generate")
    assert first.tokens("preempt") == reference.tokens("preempt")
    assert first.tokens("turn-2") == reference.tokens("turn-2")
    assert re.search(r"Stored 128 tokens \(256 already cached\) of a 389-token prompt and output", first.log)
    assert first.results["state"] == {"hits": 0, "admitted": 0, "requests": 0}  # turn-1's blocks are back
    hits = first.retrieved()
    assert (640, 700) in hits and (256, 300) in hits  # 5 chunks of P700; 2 of P300
    assert (511, 512) in hits  # a full hit leaves the last prompt token to vLLM
    assert (640, 760) in hits  # a preempted request resumed from the chunks it stored
    assert (384, 410) in hits  # turn-2: 256 of the prompt, 128 of prompt and answer

    # vLLM restart: the memory tier is gone, chunks come back from disk; every other chunk file is corrupted. This
    # vLLM loads and stores off its step: failed loads are reported from the load thread.
    chunk_files = sorted(p for p in disk.rglob("*") if p.is_file() and p.stat().st_size > 1 << 20)
    assert len(chunk_files) >= 20
    for path in chunk_files[::2]:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    off_step = {**in_process_extra(disk), **OFF_STEP}
    second = run_driver(tmp_path, spec([gen("restart", GENERATE), {"name": "state", "state": True}], off_step))
    assert second.tokens("restart") == reference.tokens("generate")
    assert "failed: vLLM recomputes them" in second.log, second.retrieved()
    assert any(loaded > 0 for loaded, _ in second.retrieved()), second.retrieved()
    assert_off_step(second)


def test_server_mode_shared_by_restarts_and_survives_server_outage(reference: Run, tmp_path: Path) -> None:
    disk = tmp_path / "server-disk"
    server_args = ("--chunk-size", str(CHUNK), "--max-local-cpu-size", "0.5", "--max-local-disk-size", "1")
    servers = [ServerProcess(disk, *server_args)]
    extra = {"chunk_size": CHUNK, "server_url": f"tcp://127.0.0.1:{servers[0].port}", "server_timeout_sec": 2}

    def on_pause(name: str) -> None:
        if name == "stop-server":
            servers[-1].stop()
        else:  # a new server on the same port and disk: chunks written to disk before the outage are back
            servers.append(ServerProcess(disk, *server_args, port=servers[0].port))

    try:
        first = run_driver(
            tmp_path,
            spec(
                [
                    gen("store", [P700, P512]),
                    {"name": "stop-server", "pause": True},
                    gen("outage", GENERATE),  # misses: vLLM keeps serving
                    {"name": "start-server", "pause": True},
                    gen("back", [P700]),
                    {"name": "state", "state": True},
                ],
                extra,
            ),
            on_pause,
        )
        expected = dict(zip(map(tuple, GENERATE), reference.tokens("generate"), strict=True))
        assert first.tokens("store") == [expected[tuple(P700)], expected[tuple(P512)]]
        assert first.tokens("outage") == reference.tokens("generate")
        assert first.tokens("back") == [expected[tuple(P700)]]
        assert first.results["state"] == {"hits": 0, "admitted": 0, "requests": 0}
        assert (640, 700) in first.retrieved()  # after the server came back

        # Another vLLM process (a restart, or a second instance) shares the server's cache, off its step.
        second = run_driver(tmp_path, spec([gen("shared", GENERATE), {"name": "state", "state": True}],
                                           {**extra, **OFF_STEP}))  # fmt: skip
        assert second.tokens("shared") == reference.tokens("generate")
        assert {(640, 700), (511, 512)} <= set(second.retrieved())
        assert_off_step(second)
    finally:
        for server in servers:
            server.stop()
