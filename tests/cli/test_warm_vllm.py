"""``kvtier warm --vllm URL`` against a real ``vllm serve`` whose kvtier connector stores into a real ``kvtier
server``: the first run stores (the server's ``/lookup`` then has the prompts), the second skips them, a prompt too
long for vLLM is counted and reported, a server the connector does not use is named. The argument checks and the
errors of a vLLM that is not there, or not vLLM, need neither."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kvtier.cli.main import main
from kvtier.cli.warm import Progress
from kvtier.cli.warm_vllm import _admin_url
from kvtier.config import load_config
from kvtier.integrations.models import is_prepared, model_path
from servers import ServerProcess, ThreadServer, free_port, http_json, vllm_serve_with_server

CHUNK = 128  # vLLM's CPU block size
SMOLLM2_LAYOUT = {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64, "dtype": "float32"}
TOKENS = list(range(1000, 1300))  # 300 ids: two full chunks
MANUAL = " ".join(
    f"Rule {i}: the depot in Lisbon ships {i * 7 % 13} crates of tea on day {i % 7 + 1}." for i in range(20)
)
CHAT = [{"role": "system", "content": MANUAL}, {"role": "user", "content": "Which day is tea?"}]


def write_prompts(path: Path, *items: object) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def test_an_unreachable_vllm_is_a_message_and_exit_1(tmp_path: Path, capsys) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", "hello")
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["warm", "--prompts", str(prompts), "--vllm", url]) == 1
    err = capsys.readouterr().err
    assert f"kvtier warm: vLLM at {url}: /v1/models:" in err and "Traceback" not in err


def test_a_url_that_is_not_vllm_is_a_message_and_exit_1(tmp_path: Path, capsys) -> None:
    server = ThreadServer(tmp_path / "disk")  # a real HTTP server, answering 404 to vLLM's paths: an operator's typo
    try:
        prompts = write_prompts(tmp_path / "p.jsonl", "hello")
        assert main(["warm", "--prompts", str(prompts), "--vllm", f"http://127.0.0.1:{server.http_port}/v1"]) == 1
        assert "/v1/models: 404" in capsys.readouterr().err
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vllm", "127.0.0.1:8000"], "--vllm '127.0.0.1:8000': expected http://HOST:PORT"),
        (["--vllm", "http://127.0.0.1:8000", "--dtype", "float16"], "--dtype is for the model run here"),
        (["--vllm", "http://127.0.0.1:8000", "--admin-url", "tcp://127.0.0.1:5555"], "--admin-url 'tcp://"),
        (["--admin-url", "http://127.0.0.1:8080"], "--admin-url is for --vllm"),
    ],
)
def test_argument_checks(tmp_path: Path, args: list[str], message: str) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", "hello")
    with pytest.raises(SystemExit, match=message):
        main(["warm", "--prompts", str(prompts), *args])


def test_a_bad_prompt_file_is_refused_before_vllm_is_asked(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", {"tokens": []})
    with pytest.raises(SystemExit, match="prompt 1: expected a string"):
        main(["warm", "--prompts", str(prompts), "--vllm", f"http://127.0.0.1:{free_port()}"])


def test_concurrency_must_be_positive(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["warm", "--prompts", "p.jsonl", "--vllm", "http://127.0.0.1:1", "--concurrency", "0"])
    assert "--concurrency: must be at least 1" in capsys.readouterr().err


def test_the_admin_url_defaults_to_the_data_planes_host() -> None:
    config = load_config(env={}, overrides={"server_url": "tcp://10.0.0.7:5555", "http_port": 8081})
    assert _admin_url(None, config) == "http://10.0.0.7:8081"
    assert _admin_url(None, load_config(env={}, overrides={"server_url": "tcp://[::1]:5555"})) == "http://[::1]:8080"
    assert _admin_url(None, load_config(env={})) is None
    assert _admin_url("http://cache:9000/", config) == "http://cache:9000"


def test_progress_is_redrawn_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    shown = Terminal()
    progress = Progress(2, shown)
    progress.advance()
    progress.advance()
    progress.close()
    assert shown.getvalue() == "\rkvtier warm: 0/2 prompts\rkvtier warm: 1/2 prompts\rkvtier warm: 2/2 prompts\n"


@contextmanager
def vllm_serve(tmp_path: Path, server_port: int) -> Iterator[str]:
    """``vllm serve`` of the local model with kvtier's connector storing into the server; its URL."""
    served = vllm_serve_with_server(
        tmp_path / "vllm.log", server_port, chunk_size=CHUNK, args=("--max-model-len", "1024")
    )
    try:
        yield served.wait_healthy(400).url
    finally:
        served.stop()


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not is_prepared(), reason="the model is not prepared: run `kvtier model prepare`")
def test_warm_through_vllm_stores_once_and_then_skips(tmp_path: Path, capsys) -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from transformers import AutoTokenizer

    server = ServerProcess(tmp_path / "disk", "--chunk-size", str(CHUNK), "--max-local-cpu-size", "0.5",
                           "--max-local-disk-size", "0.5")  # fmt: skip
    prompts = write_prompts(
        tmp_path / "prompts.jsonl",
        {"text": MANUAL},
        {"messages": CHAT},
        {"tokens": TOKENS},
        "Too short for a chunk.",
    )
    with_server = ["--server-url", f"tcp://127.0.0.1:{server.port}", "--http-port", str(server.http_port)]
    try:
        with vllm_serve(tmp_path, server.port) as url:
            warm = ["warm", "--prompts", str(prompts), "--vllm", url]
            assert main([*warm, *with_server]) == 0
            first = capsys.readouterr()
            assert "kvtier warm: 4/4 prompts" in first.err  # the progress line (stderr is no terminal here)
            # 413, 428 and 300 tokens: 3, 3 and 2 chunks
            assert f"warmed 3 prompts ({8 * CHUNK} tokens stored); 0 were cached already; 1 shorter" in first.out
            assert server.status()["tiers"]["memory"]["chunks"] == 8
            # Cached as the transformers path tokenizes them (chat messages with no generation prompt), under the
            # model vLLM loaded and its KV layout.
            tokenizer = AutoTokenizer.from_pretrained(model_path())
            chat = tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=False)
            for ids, cached in [(tokenizer(MANUAL).input_ids, 3 * CHUNK), (chat, 3 * CHUNK), (TOKENS, 2 * CHUNK)]:
                body = {"model": str(model_path()), "layout": SMOLLM2_LAYOUT, "tokens": list(ids)}
                assert http_json(server.http_port, "POST", "/lookup", body)[1]["hit_tokens"] == cached

            assert main([*warm, *with_server]) == 0
            second = capsys.readouterr()
            assert "warmed 0 prompts (0 tokens stored); 3 were cached already; 1 shorter than a chunk" in second.out
            assert "kvtier warm: 4/4 prompts" in second.err

            # Without a server to ask, every prompt is sent; one too long for vLLM is reported, the others go on.
            long = write_prompts(tmp_path / "long.jsonl", {"tokens": list(range(100, 1200))}, {"tokens": TOKENS})
            assert main(["warm", "--prompts", str(long), "--vllm", url, "--concurrency", "2"]) == 1
            third = capsys.readouterr()
            assert "sent 1 prompts to vLLM; 1 refused by vLLM; none skipped" in third.out
            assert "kvtier warm: prompt 1: vLLM refused it: " in third.err and "maximum context length" in third.err

            # Asking a server the connector does not store into: the first prompt goes through, then a clear error.
            other = ThreadServer(tmp_path / "other-disk", chunk_size=CHUNK)
            try:
                admin = f"http://127.0.0.1:{other.http_port}"
                assert main(["warm", "--prompts", str(prompts), "--vllm", url, "--admin-url", admin]) == 1
                assert f"its connector never asked the kvtier server at {admin} about" in capsys.readouterr().err
            finally:
                other.stop()
    finally:
        server.stop()
