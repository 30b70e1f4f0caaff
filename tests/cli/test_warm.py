"""``kvtier warm`` as an operator runs it: prompts from a JSON Lines file into a real server, through the real
model; a second run finds them cached and stores nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtier.cli.main import main
from servers import ThreadServer

pytest.importorskip("transformers")


def test_warm_fills_a_server_and_a_second_run_skips_it(tmp_path: Path, capsys) -> None:
    server = ThreadServer(tmp_path / "disk", chunk_size=16)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([
        json.dumps({"text": "The harbour was rebuilt after the long winter, and the market grew quiet. " * 3}),
        json.dumps({"messages": [{"role": "user", "content": "Which city ships copper wire, and why?"}]}),
        json.dumps({"text": "Too short."}),
        json.dumps({"tokens": list(range(1, 40))}),
        json.dumps("A plain string is a prompt too, as long as it spans a chunk of sixteen tokens or more."),
    ]) + "\n")  # fmt: skip
    args = ["warm", "--prompts", str(prompts), "--server-url", server.url]
    try:
        assert main(args) == 0
        first = capsys.readouterr()
        assert "warmed 4 prompts" in first.out and "0 were cached already; 1 shorter than a chunk" in first.out
        assert "kvtier warm" in first.err  # the progress bar
        assert main(args) == 0
        assert "warmed 0 prompts (0 tokens stored); 4 were cached already" in capsys.readouterr().out  # idempotent
        stored = int(first.out.split("(")[1].split()[0])
        assert server.server.service.status()["tiers"]["memory"]["chunks"] == stored // 16
    finally:
        server.stop()


def test_warm_refuses_a_cache_that_would_not_outlive_it(tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"hello"\n')
    assert main(["warm", "--prompts", str(prompts)]) == 2
    assert "nothing would outlive this command" in capsys.readouterr().err


@pytest.mark.parametrize("line", ["{not json", '{"tokens": [-1]}', "[1, 2]"])
def test_bad_prompt_files_are_clear_errors(tmp_path: Path, line: str) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(line + "\n")
    with pytest.raises(SystemExit, match="kvtier warm"):
        main(["warm", "--prompts", str(prompts), "--local-disk", str(tmp_path / "d"), "--max-local-disk-size", "0.1"])
