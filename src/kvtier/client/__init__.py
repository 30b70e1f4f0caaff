"""Client library of the kvtier cache server."""

from kvtier.client.client import KVTierClient, ServerError, ServerUnavailable

__all__ = ["KVTierClient", "ServerError", "ServerUnavailable"]
