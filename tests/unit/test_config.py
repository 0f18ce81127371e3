"""ProxyConfig: CLI > MORIIO_PROXY_* env > YAML > defaults, and one clear line per bad value."""

from __future__ import annotations

import ipaddress

import pytest

from moriio_proxy.config import OPTIONS, ConfigError, ProxyConfig, load_config
from moriio_proxy.protocol import Instance


def write_yaml(tmp_path, text: str):
    path = tmp_path / "proxy.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_any_source():
    config = load_config(env={})
    assert config == ProxyConfig()
    assert config.port == 10001
    assert config.discovery_port == 36367
    assert config.instance_ttl == 10.0
    assert config.transfer_mode == "auto"
    assert config.discovery_allow == ()
    assert config.static_instances == ()


def test_cli_beats_env_beats_yaml_beats_defaults(tmp_path):
    path = write_yaml(tmp_path, "port: 1111\ninstance_ttl: 7\nmax_retries: 3\n")
    env = {"MORIIO_PROXY_PORT": "2222", "MORIIO_PROXY_INSTANCE_TTL": "8"}
    cli = {"port": 3333}

    config = load_config(cli, env=env, config_file=path)
    assert config.port == 3333  # CLI over env and YAML
    assert config.instance_ttl == 8.0  # env over YAML
    assert config.max_retries == 3  # YAML over default
    assert config.connect_timeout == ProxyConfig().connect_timeout  # default

    assert load_config({}, env=env, config_file=path).port == 2222
    assert load_config({}, env={}, config_file=path).port == 1111


def test_unset_cli_values_and_empty_env_values_do_not_override(tmp_path):
    path = write_yaml(tmp_path, "port: 1111\n")
    # argparse leaves unset flags as None; an exported-but-empty variable is unset too.
    config = load_config({"port": None}, env={"MORIIO_PROXY_PORT": ""}, config_file=path)
    assert config.port == 1111


def test_process_environment_is_read_by_default(monkeypatch):
    monkeypatch.setenv("MORIIO_PROXY_DISCOVERY_PORT", "25000")
    assert load_config().discovery_port == 25000


def test_every_option_has_a_flag_and_env_name():
    names = {o.name for o in OPTIONS}
    assert "static_instances" not in names
    for option in OPTIONS:
        assert option.flag == "--" + option.name.replace("_", "-")
        assert option.env == "MORIIO_PROXY_" + option.name.upper()


def test_values_are_parsed_to_their_types():
    config = load_config(
        {
            "host": "127.0.0.1",
            "port": "0",
            "instance_ttl": "2.5",
            "transfer_mode": "write",
            "prefill_policy": "Round_Robin",
            "decode_policy": "LEAST_LOADED",
            "max_retries": "0",
            "log_level": "DEBUG",
        },
        env={},
    )
    assert config.host == "127.0.0.1"
    assert config.port == 0
    assert config.instance_ttl == 2.5
    assert config.transfer_mode == "WRITE"
    assert config.prefill_policy == "round_robin"
    assert config.decode_policy == "least_loaded"
    assert config.max_retries == 0
    assert config.log_level == "debug"


def test_affinity_policies_and_their_settings_from_a_file_and_flags(tmp_path):
    path = write_yaml(
        tmp_path,
        "prefill_policy: session\n"
        "decode_policy: Cache_Aware\n"
        "balance_abs_threshold: 16\n"
        "balance_rel_threshold: 2\n"
        "cache_block_chars: 64\n"
        "cache_max_blocks: 1000\n"
        "session_header: X-Conversation-Id\n",
    )
    config = load_config({"cache_max_blocks": "5000"}, env={}, config_file=path)
    assert config.prefill_policy == "session"
    assert config.decode_policy == "cache_aware"
    assert config.balance_abs_threshold == 16
    assert config.balance_rel_threshold == 2.0
    assert config.cache_block_chars == 64
    assert config.cache_max_blocks == 5000  # the flag wins over the file
    assert config.session_header == "X-Conversation-Id"
    defaults = load_config({}, env={})
    assert (defaults.prefill_policy, defaults.decode_policy) == ("cache_aware", "least_loaded")
    assert defaults.session_header == "X-Session-ID"


BAD_VALUES = [
    ("port", "abc"),
    ("port", "70000"),
    ("port", "-1"),
    ("port", "80.5"),
    ("discovery_port", "65536"),
    ("instance_ttl", "0"),
    ("instance_ttl", "-3"),
    ("instance_ttl", "nan"),
    ("instance_ttl", "inf"),
    ("instance_ttl", "soon"),
    ("connect_timeout", "0"),
    ("prefill_timeout", "-1"),
    ("decode_first_byte_timeout", "x"),
    ("stream_idle_timeout", "0"),
    ("max_retries", "-1"),
    ("max_retries", "one"),
    ("max_body_bytes", "0"),
    ("transfer_mode", "BOTH"),
    ("prefill_policy", "random"),
    ("decode_policy", "fastest"),
    ("log_level", "verbose"),
    ("balance_abs_threshold", "-1"),
    ("balance_rel_threshold", "0.5"),
    ("balance_rel_threshold", "inf"),
    ("cache_block_chars", "0"),
    ("cache_max_blocks", "0"),
    ("session_header", "X Session"),
    ("session_header", "bad:header"),
    ("discovery_allow", "10.0.0.0/33"),
    ("discovery_allow", "not-a-network"),
    ("discovery_allow", "10.0.0.0/8, "),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_bad_cli_value_names_the_flag(name, value):
    with pytest.raises(ConfigError) as info:
        load_config({name: value}, env={})
    assert "--" + name.replace("_", "-") in str(info.value)


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_bad_env_value_names_the_variable(name, value):
    with pytest.raises(ConfigError) as info:
        load_config({}, env={"MORIIO_PROXY_" + name.upper(): value})
    assert "MORIIO_PROXY_" + name.upper() in str(info.value)


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_bad_yaml_value_names_the_file_and_key(tmp_path, name, value):
    path = write_yaml(tmp_path, f"{name}: {value!r}\n")
    with pytest.raises(ConfigError) as info:
        load_config({}, env={}, config_file=path)
    assert str(path) in str(info.value)
    assert name in str(info.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("port: 80.5\n", "port"),
        ("port: true\n", "port"),
        ("max_retries: yes\n", "max_retries"),
        ("max_body_bytes: 1.5\n", "max_body_bytes"),
        ("instance_ttl: true\n", "instance_ttl"),
        ("port: null\n", "port"),
        ("port: [1]\n", "port"),
        ("host: ''\n", "host"),
    ],
)
def test_yaml_typed_values_that_are_not_the_right_kind_are_refused(tmp_path, text, key):
    # A YAML float or bool must not silently become a port or count.
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config({}, env={}, config_file=path)
    assert key in str(info.value)


def test_empty_host_on_the_command_line_is_refused():
    with pytest.raises(ConfigError, match="--host"):
        load_config({"host": " "}, env={})


def test_yaml_accepts_dashed_keys_and_native_types(tmp_path):
    path = write_yaml(
        tmp_path,
        "instance-ttl: 4\nport: 1234\ntransfer_mode: READ\ndiscovery-allow: [10.0.0.0/8]\n",
    )
    config = load_config({}, env={}, config_file=path)
    assert config.instance_ttl == 4.0
    assert config.port == 1234
    assert config.transfer_mode == "READ"
    assert config.discovery_allow == (ipaddress.ip_network("10.0.0.0/8"),)


def test_unknown_yaml_key_is_refused(tmp_path):
    path = write_yaml(tmp_path, "port: 1\nlisten_port: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config({}, env={}, config_file=path)
    assert "listen_port" in str(info.value)
    assert str(path) in str(info.value)


def test_non_string_yaml_key_is_refused_cleanly(tmp_path):
    path = write_yaml(tmp_path, "10001: port\n")
    with pytest.raises(ConfigError, match="10001"):
        load_config({}, env={}, config_file=path)


@pytest.mark.parametrize("text", ["port: [1\n", "- port\n- 1\n", "just a string\n"])
def test_yaml_that_is_not_a_mapping_is_refused(tmp_path, text):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError, match="--config"):
        load_config({}, env={}, config_file=path)


def test_missing_yaml_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--config"):
        load_config({}, env={}, config_file=tmp_path / "nope.yaml")


def test_empty_yaml_file_means_defaults(tmp_path):
    path = write_yaml(tmp_path, "# nothing here\n")
    assert load_config({}, env={}, config_file=path) == ProxyConfig()


def test_yaml_instances_become_static_instances(tmp_path):
    path = write_yaml(
        tmp_path,
        """
instances:
  - type: P
    http_address: "10.0.0.1:20005"
    zmq_address: "host:10.0.0.1,handshake:6301,notify:61005"
    dp_size: 8
    tp_size: 1
    transfer_mode: READ
  - type: register
    role: D
    request_address: "http://10.0.0.2:40005/v1/completions"
    handshake_port: 7301
    notify_port: 7501
    dp_size: 1
    tp_size: 1
    transfer_mode: READ
port: 1234
""",
    )
    config = load_config({}, env={}, config_file=path)
    assert config.port == 1234
    assert config.static_instances == (
        Instance("P", "10.0.0.1:20005", "10.0.0.1", 6301, 61005, 8, 1, "READ"),
        Instance("D", "10.0.0.2:40005", "10.0.0.2", 7301, 7501, 1, 1, "READ"),
    )


def test_bad_yaml_instance_names_its_position(tmp_path):
    path = write_yaml(
        tmp_path,
        """
instances:
  - type: P
    http_address: "10.0.0.1:20005"
    zmq_address: "host:10.0.0.1,handshake:6301,notify:61005"
    transfer_mode: READ
  - type: D
    http_address: "10.0.0.2"
    zmq_address: "host:10.0.0.2,handshake:7301,notify:7501"
    transfer_mode: READ
""",
    )
    with pytest.raises(ConfigError) as info:
        load_config({}, env={}, config_file=path)
    assert "instances[2]" in str(info.value)
    assert str(path) in str(info.value)


def test_yaml_instances_must_be_a_list(tmp_path):
    path = write_yaml(tmp_path, "instances:\n  type: P\n")
    with pytest.raises(ConfigError, match="instances"):
        load_config({}, env={}, config_file=path)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("10.0.0.0/8", ["10.0.0.0/8"]),
        ("10.0.0.0/8, 192.168.1.0/24", ["10.0.0.0/8", "192.168.1.0/24"]),
        ("10.0.0.0/8,", ["10.0.0.0/8"]),
        ("10.1.2.3", ["10.1.2.3/32"]),
        ("10.1.2.3/8", ["10.0.0.0/8"]),  # host bits are forgiven
        ("fd00::/8,127.0.0.1", ["fd00::/8", "127.0.0.1/32"]),
        (["10.0.0.0/8", "::1"], ["10.0.0.0/8", "::1/128"]),
    ],
)
def test_discovery_allow_parsing(raw, expected):
    config = load_config({"discovery_allow": raw}, env={})
    assert config.discovery_allow == tuple(ipaddress.ip_network(e) for e in expected)


def test_discovery_allow_from_env():
    config = load_config({}, env={"MORIIO_PROXY_DISCOVERY_ALLOW": "10.0.0.0/8,172.16.0.0/12"})
    assert config.discovery_allow == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("172.16.0.0/12"),
    )
