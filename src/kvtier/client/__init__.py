"""Client library of the kvtier cache server."""

from kvtier.client.async_client import AsyncKVTierClient
from kvtier.client.client import Connection, KVTierClient, ServerError, ServerUnavailable

__all__ = ["AsyncKVTierClient", "Connection", "KVTierClient", "ServerError", "ServerUnavailable"]
