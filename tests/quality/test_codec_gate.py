"""The lossy codecs' quality gate on the real SmolLM2 (int8 passes, int4 does not), and engines refusing a lossy
codec their model has not passed."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest

from kvtier import CacheEngine, KVLayout, load_config
from kvtier.codecs.gate import BOUND, GateRecord, gate_file, load_records, save_record
from kvtier.errors import ConfigError

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("blosc2")

MODEL = "smollm2-135m-instruct"
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="bfloat16")


def engine(tmp_path: Path, codec: str, model: str = MODEL, **overrides: Any) -> CacheEngine:
    config = load_config(env={}, overrides={
        "local_disk": str(tmp_path / "disk"), "max_local_disk_size": 0.1, "local_disk_serde": codec,
        "codec_gate_file": str(tmp_path / "gates.json"), "max_local_cpu_size": 0.05, **overrides,
    })  # fmt: skip
    return CacheEngine(config, LAYOUT, model_name=model)


def record(codec: str, **fields: Any) -> GateRecord:
    values = {"model": MODEL, "codec": codec, "codec_version": 1, "dtype": "float32", "prompts": 3, "new_tokens": 16,
              "first_token_kl": 0.0, "mean_kl": 0.0, "top1_agreement": 1.0, "greedy_agreement": 1.0,
              "compression_ratio": 2.0, **fields}  # fmt: skip
    return GateRecord(**values)


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvtier.integrations.models import prepare_model

    path = prepare_model()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def test_int8_passes_the_gate_on_smollm2_and_int4_does_not(smollm2, tmp_path: Path) -> None:
    from kvtier.quality.codec_gate import measure

    model, tokenizer = smollm2
    int8 = measure(model, tokenizer, "int8", MODEL, prompts=3, new_tokens=16)
    int4 = measure(model, tokenizer, "int4", MODEL, prompts=3, new_tokens=16)
    assert int8.passed and int8.mean_kl <= BOUND.max_mean_kl and int8.top1_agreement >= BOUND.min_top1_agreement
    assert int8.compression_ratio > 3.5  # fp32 KV to int8 + a scale per vector
    assert not int4.passed
    for gated in (int8, int4):
        save_record(tmp_path / "gates.json", gated)
    engine(tmp_path, "int8").close()  # measured and passed: the engine starts
    with pytest.raises(ConfigError, match="int4 failed the quality gate"):
        engine(tmp_path, "int4")


def test_a_lossy_codec_never_measured_on_the_model_is_refused(tmp_path: Path) -> None:
    save_record(tmp_path / "gates.json", record("int8"))
    with pytest.raises(ConfigError, match="never measured on model 'other-model'"):
        engine(tmp_path, "int8", model="other-model")
    with pytest.raises(ConfigError, match="remote_serde: int8"):
        engine(tmp_path, "naive", model="other-model", remote_serde="int8", remote_url="redis://127.0.0.1:1")
    engine(tmp_path, "lossless").close()  # lossless codecs need no gate
    engine(tmp_path, "int8", model="other-model", codec_gate=False).close()  # asked for explicitly


def test_records_are_replaced_per_model_codec_and_version(tmp_path: Path) -> None:
    path = tmp_path / "gates.json"
    save_record(path, record("int8", mean_kl=0.5))
    save_record(path, record("int4"))
    save_record(path, record("int8"))
    assert sorted((r.codec, r.mean_kl) for r in load_records(path)) == [("int4", 0.0), ("int8", 0.0)]
    assert replace(record("int8"), top1_agreement=0.5).passed is False


MISTYPED = json.dumps([{**asdict(record("int8")), "mean_kl": "0.0"}])


@pytest.mark.parametrize("content", ["{not json", '{"model": 1}', '[{"model": "m"}]', '["int8"]', MISTYPED])
def test_a_bad_records_file_is_a_config_error(tmp_path: Path, content: str) -> None:
    (tmp_path / "gates.json").write_text(content)
    with pytest.raises(ConfigError, match="codec_gate_file"):
        engine(tmp_path, "int8")


def test_the_default_records_file_is_in_the_user_cache(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert gate_file(load_config(env={})) == tmp_path / "kvtier" / "codec_gates.json"


def test_the_codec_gate_command_records_its_measurement(tmp_path: Path, capsys) -> None:
    from kvtier.cli.main import main

    gates = tmp_path / "gates.json"
    status = main(["codec-gate", "--codec", "int8", "--dtype", "float32", "--prompts", "1", "--new-tokens", "4",
                   "--model-name", MODEL, "--codec-gate-file", str(gates)])  # fmt: skip
    (saved,) = load_records(gates)
    assert (saved.model, saved.codec, saved.prompts, saved.new_tokens) == (MODEL, "int8", 1, 4)
    assert status == (0 if saved.passed else 1)
    assert '"passed"' in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--dtype", "int8"], ["--dtype", "float64x"], ["--prompts", "0"],
                                   ["--new-tokens", "-3"]])  # fmt: skip
def test_the_codec_gate_command_refuses_bad_flags_before_loading_anything(tmp_path: Path, flags: list[str]) -> None:
    from kvtier.cli.main import main

    with pytest.raises(SystemExit):
        main(["codec-gate", "--codec", "int8", "--codec-gate-file", str(tmp_path / "gates.json"), *flags])
    assert not (tmp_path / "gates.json").exists()
