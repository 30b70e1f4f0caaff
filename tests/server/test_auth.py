"""The shared secret: read once at start, the same on both planes, and never failing open."""

from __future__ import annotations

import pytest

from conftest import LAYOUT, InProcessServer, http_get
from kvtier.client import ServerError
from kvtier.config import load_config
from kvtier.errors import ConfigError
from kvtier.protocol import Status, layout_to_meta
from servers import http_json


@pytest.fixture
def token_server(tmp_path):  # type: ignore[no-untyped-def]
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    server = InProcessServer(tmp_path / "disk", server_auth_token_file=str(token_file))
    yield server, token_file
    server.stop()


def test_emptying_the_token_file_does_not_turn_auth_off(token_server) -> None:
    server, token_file = token_server
    token_file.write_text("")
    assert http_get(server.http_port, "/clear", method="POST")[0] == 401
    with server.client() as anonymous, pytest.raises(ServerError) as info:
        anonymous.ping()
    assert info.value.status == Status.UNAUTHORIZED
    assert http_get(server.http_port, "/clear", token="s3cret", method="POST")[0] == 200


def test_deleting_or_changing_the_token_file_keeps_the_secret_read_at_start(token_server) -> None:
    server, token_file = token_server
    token_file.unlink()
    assert http_get(server.http_port, "/clear", token="s3cret", method="POST")[0] == 200
    token_file.write_text("other")
    assert http_get(server.http_port, "/clear", token="other", method="POST")[0] == 401
    with server.client(auth_token="s3cret") as client:
        assert client.ping()["chunk_size"] > 0


def test_an_empty_or_missing_token_file_is_a_config_error(tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    for path in (empty, tmp_path / "missing"):
        config = load_config(env={}, overrides={"server_auth_token_file": str(path)})
        with pytest.raises(ConfigError, match="server_auth_token_file"):
            config.auth_token()


def test_lookups_need_the_token_too(token_server) -> None:
    """Whether a prompt is cached says what someone asked: the admin lookup is guarded like the data plane."""
    server, _ = token_server
    prompt = {"model": "m", "layout": layout_to_meta(LAYOUT), "tokens": [1, 2, 3]}
    assert http_json(server.http_port, "POST", "/lookup", prompt)[0] == 401
    assert http_json(server.http_port, "POST", "/lookup", prompt, token="s3cret")[0] == 200
