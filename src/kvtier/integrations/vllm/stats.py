"""kvtier's transfer counters in vLLM's connector statistics (logged as "KV Transfer metrics: ...")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvtier.integrations.vllm.compat import KVConnectorStats


@dataclass
class KVTierConnectorStats(KVConnectorStats):
    """Sums of the worker's :class:`~kvtier.integrations.vllm.worker.TransferStats` over an interval (vLLM
    aggregates them across workers and steps, then logs :meth:`reduce`)."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVTierConnectorStats:
        for key, value in other.data.items():
            self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        return {
            "loads": int(d.get("loads", 0)),
            "loaded_tokens": int(d.get("loaded_tokens", 0)),
            "load_failed_tokens": int(d.get("load_failed_tokens", 0)),
            "load_ms": round(1000 * d.get("load_seconds", 0.0), 1),
            "stores": int(d.get("stores", 0)),
            "stored_tokens": int(d.get("stored_tokens", 0)),
            "store_ms": round(1000 * d.get("store_seconds", 0.0), 1),
        }

    def is_empty(self) -> bool:
        return not (self.data.get("loads") or self.data.get("stores"))

    @classmethod
    def from_data(cls, data: dict[str, Any] | None) -> KVTierConnectorStats:
        return cls(data=dict(data or {}))
