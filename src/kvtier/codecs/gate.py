"""The quality gate of lossy codecs: a lossy codec serves a model only after it was measured on that model.

``kvtier codec-gate --model DIR --codec NAME`` runs a fixed prompt set through the real model twice, once from
exact KV and once from KV that went through the codec (``kvtier.integrations.transformers.codec_gate``), and
records the next-token KL divergence and top-1 agreement along exact KV's greedy output, the first token's KL and
the free-running greedy agreement in ``codec_gate_file``. An engine whose
``remote_serde`` or ``local_disk_serde`` is lossy starts only if that file holds a passing record for its model,
codec and codec version; otherwise its configuration is refused (``codec_gate: false`` skips the check, for
measuring). The bound is :data:`BOUND`; ``docs/compression.md`` has the measured table.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from kvtier.codecs.registry import codec_named
from kvtier.config import KVTierConfig, user_cache_dir
from kvtier.errors import ConfigError


@dataclass(frozen=True, slots=True)
class QualityBound:
    """What a lossy codec must keep, measured against exact KV on the same prompts."""

    max_mean_kl: float  # KL(exact || codec) of the next-token distributions over the output, nats
    min_top1_agreement: float  # fraction of the output's positions whose most likely next token is the same


# Teacher-forced on exact KV's greedy output, so one early flip between near-tied tokens does not count as the whole
# output lost; the free-running greedy agreement is recorded too.
BOUND = QualityBound(max_mean_kl=0.01, min_top1_agreement=0.95)


@dataclass(frozen=True, slots=True)
class GateRecord:
    """One measurement of one codec (name and version) on one model."""

    model: str
    codec: str
    codec_version: int
    dtype: str  # the model's KV dtype when measured
    prompts: int
    new_tokens: int
    first_token_kl: float  # nats, mean over prompts
    mean_kl: float  # nats, mean over prompts and output positions (teacher-forced)
    top1_agreement: float  # teacher-forced
    greedy_agreement: float  # free-running greedy tokens equal before the first difference, mean fraction
    compression_ratio: float  # raw KV bytes / stored bytes, over the prompt set

    @property
    def passed(self) -> bool:
        return self.mean_kl <= BOUND.max_mean_kl and self.top1_agreement >= BOUND.min_top1_agreement


def gate_file(config: KVTierConfig) -> Path:
    if config.codec_gate_file:
        return Path(config.codec_gate_file)
    return user_cache_dir() / "codec_gates.json"


def load_records(path: Path) -> list[GateRecord]:
    """The records in ``path`` (none if it does not exist); ConfigError for a file that is not a record list."""
    try:
        data = json.loads(path.read_text())
        return [_record(item) for item in data]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"codec_gate_file {path}: not a list of codec gate records ({exc})") from None


def _record(item: Any) -> GateRecord:
    """A record from its JSON object; TypeError for a missing, unknown or mistyped field (a number where a name
    should be would otherwise fail later, when an engine compares it with the bound)."""
    record = GateRecord(**item)
    for field in fields(GateRecord):
        value = getattr(record, field.name)
        wanted = {"str": str, "int": int, "float": (int, float)}[str(field.type)]
        if isinstance(value, bool) or not isinstance(value, wanted):
            raise TypeError(f"{field.name} must be a {field.type}, not {value!r}"[:200])
    return record


def save_record(path: Path, record: GateRecord) -> None:
    """Add ``record`` to ``path``, replacing an earlier one of the same model, codec and version (atomically)."""
    same = (record.model, record.codec, record.codec_version)
    kept = [r for r in load_records(path) if (r.model, r.codec, r.codec_version) != same]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump([asdict(r) for r in [*kept, record]], f, indent=1)
    os.replace(f.name, path)


def check_codecs(config: KVTierConfig, model_name: str) -> None:
    """ConfigError unless every lossy codec ``config`` names has a passing record for ``model_name``."""
    if not config.codec_gate:
        return
    for key in ("local_disk_serde", "remote_serde"):
        codec = codec_named(getattr(config, key))
        if not codec.lossy:
            continue
        path = gate_file(config)
        wanted = (model_name, codec.name, codec.version)
        record = next((r for r in load_records(path) if (r.model, r.codec, r.codec_version) == wanted), None)
        if record is None:
            raise ConfigError(
                f"{key}: {codec.name} is lossy and was never measured on model {model_name!r} (no record in {path}); "
                f"run `kvtier codec-gate --model <dir> --codec {codec.name}` first"
            )
        if not record.passed:
            raise ConfigError(
                f"{key}: {codec.name} failed the quality gate on model {model_name!r}: mean KL "
                f"{record.mean_kl:.4f} (bound {BOUND.max_mean_kl}), top-1 agreement "
                f"{record.top1_agreement:.3f} (bound {BOUND.min_top1_agreement})"
            )
