"""Client library of the kvtier cache server."""

from kvtier.client.async_client import AsyncKVTierClient
from kvtier.client.calls import BadReply, LookupReply, RetrieveReply, ServerError, ServerUnavailable, StoreReply
from kvtier.client.client import Connection, KVTierClient

__all__ = [
    "AsyncKVTierClient",
    "BadReply",
    "Connection",
    "KVTierClient",
    "LookupReply",
    "RetrieveReply",
    "ServerError",
    "ServerUnavailable",
    "StoreReply",
]
