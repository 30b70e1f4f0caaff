"""Building replies: shared by the server's op modules and its data plane."""

from __future__ import annotations

from typing import Any

from kvtier.engine.results import StoreResult
from kvtier.protocol import Message, Op, Status


def reply_to(request: Message, meta: dict[str, Any], payload: list[memoryview] | None = None) -> Message:
    return Message(request.op, request.request_id, meta, payload or [])


def error_reply(request: Message, status: Status, message: str) -> Message:
    return Message(request.op, request.request_id, {"error": message}, [], status)


def store_meta(result: StoreResult) -> dict[str, int]:
    return {
        "stored_tokens": result.stored_tokens,
        "skipped_tokens": result.skipped_tokens,
        "dropped_tokens": result.dropped_tokens,
    }


def op_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return "UNKNOWN"
