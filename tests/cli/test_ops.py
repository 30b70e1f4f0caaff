"""``kvtier ping | status | lookup | explain | clear`` against a real server (its admin API over HTTP), with and
without the bearer token."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvtier import KVLayout
from kvtier.cli.main import main
from kvtier.client import KVTierClient
from servers import ThreadServer

LAYOUT = KVLayout(2, 2, 16)
CHUNK = 16


@pytest.fixture
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    token = tmp_path / "token"
    token.write_text("s3cret")
    started = ThreadServer(tmp_path / "disk", chunk_size=CHUNK, server_auth_token_file=str(token))
    with KVTierClient(started.url, model="ops-model", layout=LAYOUT, chunk_size=CHUNK, auth_token="s3cret") as client:
        client.store(list(range(40)), np.ones(LAYOUT.chunk_shape(40), np.float16))
        client.lookup(list(range(40)))
    yield started, token
    started.stop()


def run(capsys, server, *args: str, token: bool = True) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    started, token_file = server
    auth = ["--server-auth-token-file", str(token_file)] if token else []
    status = main([*args, "--url", f"http://127.0.0.1:{started.http_port}", *auth])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_ping_and_status(server, capsys) -> None:
    status, out, _ = run(capsys, server, "ping")
    assert status == 0 and out.startswith("healthy in ")
    status, out, _ = run(capsys, server, "status")
    assert status == 0
    assert "chunk size 16" in out and "memory" in out and "2 chunks" in out
    assert "lookup hit rate: 80.0% of 40 tokens" in out and "serving ops-model" in out
    status, out, _ = run(capsys, server, "status", "--json")
    assert status == 0 and json.loads(out)["tiers"]["memory"]["chunks"] == 2


def test_lookup_by_token_ids_from_the_command_line_or_a_file(server, capsys, tmp_path: Path) -> None:
    prompt = ["lookup", "--model", "ops-model", "--layout", "2,2,16,float16"]
    status, out, _ = run(capsys, server, *prompt, "--tokens", ",".join(map(str, range(40))))
    assert status == 0 and out.strip() == "32 of 40 tokens cached (32 from memory; chunks of 16)"
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([*range(16), 999, 1000]))
    status, out, _ = run(capsys, server, *prompt, "--tokens", f"@{ids}", "--json")
    assert status == 0 and json.loads(out)["hit_tokens"] == 16
    status, out, _ = run(capsys, server, *prompt, "--tokens", "1,2", "--cache-salt", "someone-else")
    assert status == 0 and "0 of 2 tokens cached (nothing cached" in out


def test_lookup_of_text_through_the_models_tokenizer(server, capsys) -> None:
    pytest.importorskip("transformers")
    from kvtier.integrations.models import prepare_model

    status, out, _ = run(capsys, server, "lookup", "--model", "ops-model", "--layout", "2,2,16",
                         "--text", "Hello there", "--tokenizer", str(prepare_model()))  # fmt: skip
    assert status == 0 and "0 of " in out


def test_explain_names_the_tier_or_the_reason_of_each_part(server, capsys) -> None:
    """The stored 40-token prompt: two chunks cached, the tail a partial chunk; a prompt whose second chunk differs
    misses from there on; another model's view of the same tokens says which model has them."""
    prompt = ["explain", "--model", "ops-model", "--layout", "2,2,16"]
    status, out, _ = run(capsys, server, *prompt, "--tokens", ",".join(map(str, range(40))))
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == "32 of 40 tokens cached (chunks of 16)"
    assert lines[1].split() == ["tokens", "0-32", "cached", "in", "memory"]
    assert lines[2].split()[:4] == ["tokens", "32-40", "miss:", "partial_chunk"]
    other = ["explain", "--model", "other-model", "--layout", "2,2,16", "--tokens", ",".join(map(str, range(32)))]
    status, out, _ = run(capsys, server, *other)
    assert status == 0 and "miss: other_namespace (cached under model 'ops-model'" in out
    status, out, _ = run(capsys, server, *prompt, "--tokens", "1,2", "--json")
    assert status == 0 and json.loads(out)["miss_tokens"] == {"partial_chunk": 2}
    status, _, err = run(capsys, server, *prompt, "--tokens", "1,2", token=False)
    assert status == 1 and "401" in err


def test_clear_one_tenant_or_everything(server, capsys) -> None:
    status, out, _ = run(capsys, server, "clear", "--cache-salt", "nobody")
    assert status == 0 and out.strip() == "cleared 0 chunks"
    status, out, _ = run(capsys, server, "clear")
    assert status == 0 and out.strip() == "cleared 4 chunks"  # 2 in memory, 2 on disk


def test_errors_are_reported_not_raised(server, capsys) -> None:
    status, _, err = run(capsys, server, "clear", token=False)
    assert status == 1 and "401" in err
    status, _, err = run(capsys, server, "lookup", "--model", "m", "--layout", "2,2,16", "--tokens", "-1")
    assert status == 1 and "400" in err
    with pytest.raises(SystemExit, match="expected LAYERS"):
        run(capsys, server, "lookup", "--model", "m", "--layout", "2,2", "--tokens", "1")
    assert main(["ping", "--url", "http://127.0.0.1:9"]) == 1
    assert "kvtier ping: http://127.0.0.1:9" in capsys.readouterr().err


@pytest.mark.parametrize("transport", [[], ["--tcp"]])
def test_bench_against_a_running_server(server, capsys, transport: list[str]) -> None:
    started, token_file = server
    status = main(["bench", "--url", started.url, "--tokens", "256", "--layout", "2,2,64", "--reps", "2",
                   "--server-auth-token-file", str(token_file), "--json", *transport])  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert status == 0 and result["path"] == ("TCP" if transport else "shared-memory")
    assert result["store"]["gbps"] > 0 and result["retrieve"]["gbps"] > 0 and result["lookup"]["median_ms"] > 0
    assert started.server.service.status()["tiers"]["memory"]["chunks"] == 2  # the bench's prompts are gone
    status = main(["bench", "--url", started.url, "--tokens", "64", "--layout", "2,2,64", "--reps", "1",
                   "--server-auth-token-file", str(token_file)])  # fmt: skip
    assert status == 0 and "memcpy here" in capsys.readouterr().out
