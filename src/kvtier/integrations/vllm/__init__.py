"""kvtier as a vLLM v1 KV connector: ``kv_connector_module_path="kvtier.integrations.vllm"``,
``kv_connector="KVTierConnector"``. See ``docs/vllm.md``.

The connector (and vLLM) is imported on first use of ``KVTierConnector``, so :mod:`.layouts` (torch only) can be
used and tested without vLLM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvtier.integrations.vllm.connector import KVTierConnector

__all__ = ["KVTierConnector"]


def __getattr__(name: str) -> Any:
    if name == "KVTierConnector":
        from kvtier.integrations.vllm.connector import KVTierConnector

        return KVTierConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
