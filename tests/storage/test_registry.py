"""Building remote tiers by URL scheme: kvtier's own, and third-party tiers registered through the ``kvtier.tiers``
entry point group by an installed distribution (the test plugin in ``plugin_tier/``: a module and its dist-info,
found by importlib.metadata on sys.path as pip would install it); the install hint for a missing library."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvtier import CacheEngine, KVLayout, load_config
from kvtier.errors import ConfigError
from kvtier.metrics import CacheMetrics
from kvtier.storage.registry import BUILTIN_TIERS, create_remote_tier, remote_tiers

PLUGIN = Path(__file__).parent / "plugin_tier"


@pytest.fixture
def plugin_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(PLUGIN))  # also invalidates importlib's caches


def test_a_plugin_adds_its_scheme(plugin_installed, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="kvtier"):
        tiers = remote_tiers()
    assert tiers["dirstore"].target == "kvtier_example_tier:create_tier"
    assert set(BUILTIN_TIERS) < set(tiers)


def test_a_plugin_cannot_take_over_a_builtin_scheme(plugin_installed, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="kvtier"):
        assert remote_tiers()["redis"] == BUILTIN_TIERS["redis"]
    assert any("kvtier-example-tier" in r.message and "redis://" in r.message for r in caplog.records)


LAYOUT = KVLayout(2, 2, 16)
TOKENS = list(range(48))
KV = np.random.default_rng(3).standard_normal(LAYOUT.chunk_shape(48)).astype(np.float16)


def plugin_engine(root: Path) -> CacheEngine:
    """An engine whose only tier below staging memory is the plugin's, in ``root``."""
    overrides = {"remote_url": f"dirstore://{root}", "chunk_size": 16, "local_cpu": False, "max_local_cpu_size": 0.01}
    return CacheEngine(load_config(env={}, overrides=overrides), LAYOUT, model_name="plugin")


def test_a_plugin_tier_serves_an_engine(plugin_installed, tmp_path: Path) -> None:
    with plugin_engine(tmp_path) as engine:
        assert engine.store(TOKENS, KV).stored_tokens == 48 and engine.flush(10)
        got = engine.retrieve(TOKENS)
        assert got.tier_tokens == {"dirstore": 48}
        assert np.array_equal(got.kv.view(np.uint16), KV.view(np.uint16))
    assert len([p for p in tmp_path.rglob("*") if p.is_file()]) == 3


_OTHER_PROCESS = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from test_registry import KV, TOKENS, plugin_engine

with plugin_engine(sys.argv[1]) as engine:
    got = engine.retrieve(TOKENS)
    print(got.tier_tokens, np.array_equal(got.kv.view(np.uint16), KV.view(np.uint16)))
"""


def test_an_installed_plugin_is_found_by_another_process(plugin_installed, tmp_path: Path) -> None:
    """What one process stored through the plugin, another (the plugin on its path as pip would put it) reads."""
    with plugin_engine(tmp_path) as engine:
        engine.store(TOKENS, KV)
        assert engine.flush(10)
    env = {"PYTHONPATH": str(PLUGIN), "PATH": "/usr/bin:/bin"}
    args = [sys.executable, "-c", _OTHER_PROCESS, str(tmp_path), str(Path(__file__).parent)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "{'dirstore': 48} True"


def test_a_plugin_missing_its_library_names_its_distribution(plugin_installed) -> None:
    with pytest.raises(ConfigError, match=r"needs kvtier_library_that_is_not_installed: .*kvtier-example-tier"):
        create_remote_tier("needs-a-library://x", load_config(env={}), CacheMetrics())


def test_a_builtin_missing_its_library_names_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "kvtier.storage.memcached", raising=False)
    for name in [n for n in sys.modules if n.split(".")[0] == "pymemcache"] or ["pymemcache"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(ConfigError, match=r"needs pymemcache: pip install 'kvtier\[memcached\]'"):
        create_remote_tier("memcached://127.0.0.1:1", load_config(env={}), CacheMetrics())


def test_an_unknown_scheme_lists_what_is_available(plugin_installed) -> None:
    with pytest.raises(ConfigError, match=r"no remote tier for scheme 'nope' \(available: .*dirstore.*memcached"):
        create_remote_tier("nope://x", load_config(env={}), CacheMetrics())
