"""Client library of the kvtier cache server."""

from kvtier.client.client import Connection, KVTierClient, ServerError, ServerUnavailable

__all__ = ["Connection", "KVTierClient", "ServerError", "ServerUnavailable"]
