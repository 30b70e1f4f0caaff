"""Configuration loading: defaults, YAML, environment, overrides, LMCache compatibility and validation."""

from __future__ import annotations

import dataclasses
import logging
import textwrap

import pytest

from kvtier.config import GiB, KVTierConfig, load_config
from kvtier.errors import ConfigError


def write_yaml(tmp_path, text: str, name: str = "kvtier.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults():
    """With no file, environment or overrides every field has its documented default."""
    cfg = load_config(env={})
    assert cfg == KVTierConfig()
    assert cfg.chunk_size == 256
    assert cfg.save_unfull_chunk is False
    assert cfg.local_cpu is True
    assert cfg.max_local_cpu_size == 5.0
    assert cfg.cache_policy == "LRU"
    assert cfg.local_disk is None
    assert cfg.max_local_disk_size == 0.0
    assert cfg.remote_url is None
    assert cfg.pin_timeout_sec == 300.0
    assert cfg.read_workers == 4
    assert cfg.local_cpu_bytes == 5 * GiB
    assert cfg.to_dict()["chunk_size"] == 256


def test_config_is_frozen():
    """A loaded configuration cannot be mutated."""
    cfg = load_config(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.chunk_size = 1  # type: ignore[misc]


def test_yaml_file(tmp_path):
    """Values from a YAML file replace the defaults, typed per field."""
    path = write_yaml(
        tmp_path,
        """
        chunk_size: 64
        save_unfull_chunk: true
        max_local_cpu_size: 0.5
        cache_policy: s3fifo
        pin_timeout_sec: 2
        log_level: debug
        """,
    )
    cfg = load_config(path, env={})
    assert cfg.chunk_size == 64
    assert cfg.save_unfull_chunk is True
    assert cfg.max_local_cpu_size == 0.5 and cfg.local_cpu_bytes == GiB // 2
    assert cfg.cache_policy == "s3fifo"
    assert cfg.pin_timeout_sec == 2.0 and isinstance(cfg.pin_timeout_sec, float)


def test_empty_yaml_file_gives_defaults(tmp_path):
    """An empty file is an empty mapping."""
    assert load_config(write_yaml(tmp_path, ""), env={}) == KVTierConfig()


def test_precedence(tmp_path):
    """defaults < YAML < LMCACHE_* < KVTIER_* < overrides; None overrides are ignored."""
    path = write_yaml(tmp_path, "chunk_size: 16\nread_workers: 2\npin_timeout_sec: 5\ncache_policy: FIFO\n")
    env = {"LMCACHE_CHUNK_SIZE": "32", "LMCACHE_READ_WORKERS": "3", "KVTIER_CHUNK_SIZE": "48"}
    cfg = load_config(path, env=env, overrides={"chunk_size": 64, "cache_policy": None})
    assert cfg.chunk_size == 64  # override beats KVTIER_ beats LMCACHE_ beats YAML
    assert cfg.read_workers == 3  # LMCACHE_ beats YAML
    assert cfg.pin_timeout_sec == 5.0  # YAML beats default
    assert cfg.cache_policy == "FIFO"  # None override ignored
    assert cfg.max_local_cpu_size == 5.0  # default
    assert load_config(path, env=env).chunk_size == 48
    assert load_config(path, env={"LMCACHE_CHUNK_SIZE": "32"}).chunk_size == 32
    assert load_config(path, env={}).chunk_size == 16


def test_kvtier_env_wins_regardless_of_environment_order():
    """KVTIER_ beats LMCACHE_ even when the LMCACHE_ variable comes later in the mapping."""
    env = {"KVTIER_CHUNK_SIZE": "48", "LMCACHE_CHUNK_SIZE": "32"}
    assert load_config(env=env).chunk_size == 48


@pytest.mark.parametrize("variable", ["LMCACHE_CONFIG_FILE", "KVTIER_CONFIG_FILE"])
def test_config_file_from_environment(tmp_path, variable):
    """LMCACHE_CONFIG_FILE and KVTIER_CONFIG_FILE name the YAML file (and are not config keys)."""
    path = write_yaml(tmp_path, "chunk_size: 128\n")
    assert load_config(env={variable: str(path)}).chunk_size == 128


def test_config_file_variable_and_argument_priority(tmp_path):
    """KVTIER_CONFIG_FILE beats LMCACHE_CONFIG_FILE; an explicit path beats both."""
    lm = write_yaml(tmp_path, "chunk_size: 1\n", "lm.yaml")
    kv = write_yaml(tmp_path, "chunk_size: 2\n", "kv.yaml")
    arg = write_yaml(tmp_path, "chunk_size: 3\n", "arg.yaml")
    env = {"LMCACHE_CONFIG_FILE": str(lm), "KVTIER_CONFIG_FILE": str(kv)}
    assert load_config(env=env).chunk_size == 2
    assert load_config(arg, env=env).chunk_size == 3


def test_lmcache_style_yaml(tmp_path):
    """An LMCache configuration file with the shared keys loads unchanged."""
    disk = tmp_path / "disk"
    path = write_yaml(
        tmp_path,
        f"""
        chunk_size: 256
        local_cpu: true
        max_local_cpu_size: 5.0
        local_disk: "file://{disk}"
        max_local_disk_size: 20
        cache_policy: "LRU"
        remote_url: null
        save_unfull_chunk: false
        """,
        "lmcache.yaml",
    )
    cfg = load_config(env={"LMCACHE_CONFIG_FILE": str(path)})
    assert cfg.chunk_size == 256
    assert cfg.local_cpu is True
    assert cfg.local_disk == str(disk)  # file:// stripped
    assert cfg.max_local_disk_size == 20.0
    assert cfg.local_disk_bytes == 20 * GiB
    assert cfg.cache_policy == "LRU"
    assert cfg.remote_url is None


def test_local_disk_plain_path_kept(tmp_path):
    """A plain directory path is used as is."""
    cfg = load_config(env={}, overrides={"local_disk": str(tmp_path), "max_local_disk_size": 1})
    assert cfg.local_disk == str(tmp_path)


def test_unknown_yaml_key(tmp_path):
    """An unknown key raises ConfigError naming the key and the file."""
    path = write_yaml(tmp_path, "chunk_size: 16\nchunck_sise: 32\n")
    with pytest.raises(ConfigError, match="chunck_sise") as info:
        load_config(path, env={})
    assert str(path) in str(info.value)


@pytest.mark.parametrize("key", ["use_layerwise", "enable_p2p", "enable_pd"])
def test_unsupported_lmcache_key(tmp_path, key):
    """LMCache options kvtier lacks are rejected with 'not supported', not 'unknown', when turned on."""
    path = write_yaml(tmp_path, f"{key}: true\n")
    with pytest.raises(ConfigError, match="not supported") as info:
        load_config(path, env={})
    assert key in str(info.value)


def test_lmcache_file_with_inert_options_loads(tmp_path):
    """A typical LMCache file that names options kvtier lacks, at their "off" values, loads unchanged."""
    text = (
        "chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 2.0\nremote_serde: naive\n"
        "use_layerwise: false\nenable_blending: false\npre_caching_hash_algorithm: sha256_cbor\n"
    )
    cfg = load_config(write_yaml(tmp_path, text), env={})
    assert cfg.max_local_cpu_size == 2.0


def test_unsupported_lmcache_key_as_override():
    """The same check applies to overrides."""
    with pytest.raises(ConfigError, match="not supported"):
        load_config(env={}, overrides={"enable_pd": True})
    with pytest.raises(ConfigError, match="bogus"):
        load_config(env={}, overrides={"bogus": 1})


def test_non_mapping_yaml(tmp_path):
    """A YAML file that is not a mapping raises ConfigError."""
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write_yaml(tmp_path, "- chunk_size\n- 16\n"), env={})


def test_invalid_yaml_and_missing_file(tmp_path):
    """Malformed YAML and unreadable files raise ConfigError, not yaml or OS errors."""
    with pytest.raises(ConfigError, match="YAML"):
        load_config(write_yaml(tmp_path, "chunk_size: [16\n"), env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", env={})


@pytest.mark.parametrize("variable", ["KVTIER_VENV", "KVTIER_MODELS_DIR", "KVTIER_FOO"])
def test_kvtier_variables_that_are_not_keys_are_ignored(variable, caplog):
    """The project's own scripts read KVTIER_VENV and KVTIER_MODELS_DIR: they are not configuration, and must
    not stop `kvtier server` or `kvtier config` (they used to: "unknown environment variable")."""
    with caplog.at_level(logging.WARNING, logger="kvtier"):
        assert load_config(env={variable: "/somewhere"}).chunk_size == 256
    assert not caplog.records


def test_a_typo_of_a_key_in_the_environment_warns_naming_the_key(caplog):
    with caplog.at_level(logging.WARNING, logger="kvtier"):
        config = load_config(env={"KVTIER_CHUNCK_SIZE": "16"})
    assert config.chunk_size == 256  # ignored, as every variable that is not a key
    assert "KVTIER_CHUNCK_SIZE" in caplog.text and "KVTIER_CHUNK_SIZE" in caplog.text


def test_unknown_lmcache_env_variable_ignored():
    """LMCACHE_ holds many non-config variables (telemetry, logging); unknown ones are ignored."""
    cfg = load_config(env={"LMCACHE_FOO": "1", "LMCACHE_USE_EXPERIMENTAL": "True", "LMCACHE_TRACK_USAGE": "false"})
    assert cfg == KVTierConfig()


@pytest.mark.parametrize("empty", ["{}", "", "null"])
def test_lmcache_extra_config_loads_empty_and_is_refused_with_options(tmp_path, empty):
    """LMCache's extra_config carries plugin options; kvtier has no plugin to read them: an empty one loads, one
    with options is an error naming it (never silently ignored)."""
    assert load_config(write_yaml(tmp_path, f"extra_config: {empty}\n"), env={}) == KVTierConfig()
    with pytest.raises(ConfigError, match="extra_config"):
        load_config(write_yaml(tmp_path, "extra_config: {vendor_option: 3}\n"), env={})


def test_lmcache_env_option_kvtier_lacks_is_checked():
    """An LMCache option kvtier does not implement loads when it says "off" and fails when it asks for more."""
    assert load_config(env={"LMCACHE_ENABLE_PD": "false", "LMCACHE_REMOTE_SERDE": "naive"}) == KVTierConfig()
    with pytest.raises(ConfigError, match=r"LMCACHE_ENABLE_PD.*not supported"):
        load_config(env={"LMCACHE_ENABLE_PD": "1"})


def test_lmcache_blending_keys_load_with_their_names():
    """LMCache's CacheBlend keys and variables mean the same here."""
    env = {
        "LMCACHE_ENABLE_BLENDING": "True",
        "LMCACHE_BLEND_SPECIAL_STR": " # # ",
        "LMCACHE_BLEND_RECOMPUTE_RATIOS": "0.3",
        "LMCACHE_BLEND_CHECK_LAYERS": "2",
        "LMCACHE_BLEND_MIN_TOKENS": "64",
    }
    cfg = load_config(env=env)
    assert cfg.enable_blending and cfg.blend_special_str == " # # " and cfg.blend_recompute_ratios == 0.3
    assert (cfg.blend_check_layers, cfg.blend_min_tokens) == (2, 64)
    for bad in (
        {"blend_recompute_ratios": 1.5},
        {"blend_check_layers": 0},
        {"enable_blending": True, "blend_special_str": ""},
    ):
        with pytest.raises(ConfigError, match="blend"):
            load_config(env={}, overrides=bad)


def test_env_values_are_typed():
    """Environment strings are converted to each field's type."""
    cfg = load_config(
        env={
            "KVTIER_MAX_LOCAL_CPU_SIZE": "0.25",
            "LMCACHE_LOCAL_CPU": "False",
            "KVTIER_REMOTE_URL": "none",
            "LMCACHE_LOCAL_DISK": "",
        }
    )
    assert cfg.max_local_cpu_size == 0.25
    assert cfg.local_cpu is False
    assert cfg.remote_url is None
    assert cfg.local_disk is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", True),
        ("true", True),
        ("True", True),
        ("YES", True),
        ("on", True),
        (" true ", True),
        ("0", False),
        ("false", False),
        ("FALSE", False),
        ("no", False),
        ("Off", False),
    ],
)
def test_bool_parsing_from_env(text, expected):
    """Booleans accept 1/0, true/false, yes/no, on/off in any case."""
    assert load_config(env={"KVTIER_SAVE_UNFULL_CHUNK": text}).save_unfull_chunk is expected
    assert load_config(env={"LMCACHE_LOCAL_CPU": text}).local_cpu is expected


@pytest.mark.parametrize("text", ["maybe", "2", "", "tru"])
def test_bad_bool_from_env(text):
    """Anything else is a ConfigError naming the variable."""
    with pytest.raises(ConfigError, match="KVTIER_SAVE_UNFULL_CHUNK"):
        load_config(env={"KVTIER_SAVE_UNFULL_CHUNK": text})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("chunk_size", 0),
        ("chunk_size", -16),
        ("chunk_size", "abc"),
        ("chunk_size", 1.5),
        ("chunk_size", True),
        ("chunk_size", [16]),
        ("read_workers", 0),
        ("cache_policy", "XYZ"),
        ("max_local_cpu_size", -1),
        ("max_local_cpu_size", 0),
        ("max_local_cpu_size", "lots"),
        ("max_local_disk_size", -1.0),
        ("max_background_write_size", -0.5),
        ("pin_timeout_sec", -1),
        ("save_unfull_chunk", "sometimes"),
        ("log_level", "LOUD"),
        ("chunk_size", None),
    ],
)
def test_bad_values_name_the_key(tmp_path, key, value):
    """Invalid values raise ConfigError naming the key, from YAML and from overrides."""
    text = f"{key}: {value!r}\n" if value is not None else f"{key}: null\n"
    if isinstance(value, bool | list):
        text = f"{key}: {str(value).lower()}\n"
    with pytest.raises(ConfigError, match=key):
        load_config(write_yaml(tmp_path, text), env={})
    if value is not None:  # None overrides mean "not given"
        with pytest.raises(ConfigError, match=key):
            load_config(env={}, overrides={key: value})


@pytest.mark.parametrize(
    ("variable", "value"),
    [("KVTIER_CHUNK_SIZE", "abc"), ("LMCACHE_CHUNK_SIZE", "0"), ("KVTIER_CACHE_POLICY", "XYZ")],
)
def test_bad_env_values_name_the_key(variable, value):
    """Invalid environment values raise ConfigError naming the key."""
    key = variable.split("_", 1)[1].lower()
    with pytest.raises(ConfigError, match=key):
        load_config(env={variable: value})


def test_local_disk_requires_size(tmp_path):
    """local_disk without a positive max_local_disk_size is rejected, naming the size key."""
    with pytest.raises(ConfigError, match="max_local_disk_size"):
        load_config(env={}, overrides={"local_disk": str(tmp_path)})
    with pytest.raises(ConfigError, match="max_local_disk_size"):
        load_config(write_yaml(tmp_path, f"local_disk: file://{tmp_path}\nmax_local_disk_size: 0\n"), env={})


@pytest.mark.parametrize("policy", ["LRU", "lru", "LFU", "FIFO", "S3FIFO", "s3-fifo"])
def test_cache_policies_accepted(policy):
    """Every eviction policy name (any case, with aliases) is accepted."""
    assert load_config(env={}, overrides={"cache_policy": policy}).cache_policy == policy


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_local_cpu_size", "nan"),
        ("max_local_disk_size", "nan"),
        ("pin_timeout_sec", "nan"),
        ("max_local_cpu_size", "inf"),
        ("max_background_write_size", "inf"),
    ],
)
def test_non_finite_sizes_rejected(key, value):
    """NaN (which passes every '< 0' check) and infinite byte budgets are ConfigErrors, not crashes later."""
    with pytest.raises(ConfigError, match=key):
        load_config(env={"KVTIER_" + key.upper(): value})
    if key == "max_local_disk_size":  # only checked when a disk tier is configured
        with pytest.raises(ConfigError, match=key):
            load_config(env={"KVTIER_" + key.upper(): value}, overrides={"local_disk": "/nonexistent"})


def test_infinite_pin_timeout_means_never_expire():
    """pin_timeout_sec may be infinite (leases then last until released)."""
    assert load_config(env={"KVTIER_PIN_TIMEOUT_SEC": "inf"}).pin_timeout_sec == float("inf")
