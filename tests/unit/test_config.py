"""Configuration: defaults, YAML files, environment overrides, and errors that say what is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sink import config
from sink.config import Config
from sink.errors import ConfigError, SinkError

REPO = Path(__file__).resolve().parents[2]


def build(data: dict[str, Any] | None = None, **env: str) -> Config:
    return config.build(data or {}, env)


def error(data: dict[str, Any] | None = None, **env: str) -> str:
    with pytest.raises(ConfigError) as info:
        build(data, **env)
    return str(info.value)


# --- defaults -------------------------------------------------------------------------------


def test_defaults_load_from_an_empty_mapping() -> None:
    cfg = build()
    assert cfg.kafka.bootstrap_servers == "localhost:9092"
    assert cfg.kafka.group_id == "sink"
    assert cfg.kafka.topics is None
    assert cfg.kafka.topics_regex == r"^om_(?P<namespace>.+)_events$"
    assert cfg.kafka.auto_offset_reset == "earliest"
    assert cfg.events.max_event_bytes == 1024 * 1024
    assert cfg.dedup.enabled is True
    assert cfg.dedup.ttl == 32 * 86400
    assert cfg.dedup.on_error == "block"
    assert cfg.clickhouse.events_table == "events"
    assert cfg.clickhouse.offsets_table == "sink_offsets"
    assert cfg.batch.max_rows == 25_000
    assert cfg.batch.max_bytes == 16 * 1024**2
    assert cfg.batch.max_wait == 1.0
    assert cfg.batch.max_in_flight >= cfg.batch.max_rows
    assert cfg.http.port == 8080
    assert cfg.worker.id


def test_load_without_a_file_gives_defaults() -> None:
    loaded, defaults = config.load(None, {}), build()
    assert loaded.model_dump(exclude={"worker": {"id"}}) == defaults.model_dump(
        exclude={"worker": {"id"}}
    )


def test_config_is_frozen() -> None:
    cfg = build()
    with pytest.raises(ValueError):
        cfg.batch.max_rows = 1  # type: ignore[misc]


def test_dlq_topic_defaults_to_group_id() -> None:
    assert build().dlq_topic == "sink.dlq"
    assert build({"kafka": {"group_id": "billing"}}).dlq_topic == "billing.dlq"
    assert build({"kafka": {"group_id": "g"}, "dlq": {"topic": "dead"}}).dlq_topic == "dead"


def test_build_does_not_modify_its_input() -> None:
    data = {"kafka": {"group_id": "g"}}
    build(data, SINK__KAFKA__GROUP_ID="h")
    assert data == {"kafka": {"group_id": "g"}}


# --- files ----------------------------------------------------------------------------------


def test_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "sink.yaml"
    path.write_text(
        "kafka:\n"
        "  group_id: billing\n"
        "  topics: [om_a_events, om_b_events]\n"
        "batch:\n"
        "  max_rows: 1000\n"
        "  max_wait: 250ms\n"
        "  max_bytes: 4MiB\n"
        "dedup:\n"
        "  ttl: 7d\n"
    )
    cfg = config.load(path, {})
    assert cfg.kafka.group_id == "billing"
    assert cfg.kafka.topics == ("om_a_events", "om_b_events")
    assert cfg.batch.max_rows == 1000
    assert cfg.batch.max_wait == pytest.approx(0.25)
    assert cfg.batch.max_bytes == 4 * 1024**2
    assert cfg.dedup.ttl == 7 * 86400


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    assert config.load(path, {}).batch == build().batch


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sink.yaml"
    path.write_text("kafka:\n  group_id: from-file\n  client_id: kept\n")
    cfg = config.load(path, {"SINK__KAFKA__GROUP_ID": "from-env"})
    assert cfg.kafka.group_id == "from-env"
    assert cfg.kafka.client_id == "kept"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="not found") as info:
        config.load(path, {})
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_file_that_is_not_a_mapping(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="mapping"):
        config.load(path, {})


def test_file_that_is_not_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("kafka: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(path, {})


@pytest.mark.parametrize("name", ["sink.example.yaml", "local.yaml"])
def test_shipped_config_files_load(name: str) -> None:
    assert isinstance(config.load(REPO / "config" / name, {}), Config)


def test_example_file_shows_the_defaults() -> None:
    example = config.load(REPO / "config" / "sink.example.yaml", {})
    defaults = build()
    for section in Config.model_fields:
        if section != "worker":
            assert getattr(example, section) == getattr(defaults, section), section
    assert example.worker.model_dump(exclude={"id"}) == defaults.worker.model_dump(exclude={"id"})


# --- environment ----------------------------------------------------------------------------


def test_env_group_id() -> None:
    assert build(SINK__KAFKA__GROUP_ID="billing").kafka.group_id == "billing"


def test_env_flow_list() -> None:
    assert build(SINK__KAFKA__TOPICS="[a, b]").kafka.topics == ("a", "b")


def test_env_integer() -> None:
    assert build(SINK__BATCH__MAX_ROWS="100").batch.max_rows == 100


def test_env_boolean() -> None:
    assert build(SINK__DEDUP__ENABLED="false").dedup.enabled is False


def test_env_flow_mapping() -> None:
    cfg = build(SINK__CLICKHOUSE__INSERT_SETTINGS="{max_insert_threads: 4, async_insert: 0}")
    assert cfg.clickhouse.insert_settings == {"max_insert_threads": 4, "async_insert": 0}


def test_env_prefix_is_upper_case_and_the_path_is_case_insensitive() -> None:
    assert build(sink__kafka__group_id="x").kafka.group_id == "sink"
    assert build(SINK__Kafka__Group_Id="x").kafka.group_id == "x"


def test_other_variables_are_ignored() -> None:
    assert build(PATH="/bin", SINK_KAFKA_GROUP_ID="x", KAFKA__GROUP_ID="y").kafka.group_id == "sink"


def test_env_needs_section_and_key() -> None:
    message = error(SINK__BATCH="1")
    assert "SINK__BATCH" in message
    assert "SINK__<SECTION>__<KEY>" in message


def test_env_into_a_non_section() -> None:
    with pytest.raises(ConfigError, match="not a section"):
        build({"kafka": {"group_id": "g"}}, SINK__KAFKA__GROUP_ID__X="1")


def test_env_unknown_section() -> None:
    assert "nope" in error(SINK__NOPE__KEY="1")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("32d", 32 * 86400.0),
        ("1.5", 1.5),
        ("2", 2.0),
        (" 10 s ", 10.0),
        ("0.25s", 0.25),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert build(SINK__BATCH__MAX_WAIT=text).batch.max_wait == pytest.approx(seconds)
    assert build({"worker": {"drain_timeout": text}}).worker.drain_timeout == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("16MiB", 16 * 1024**2),
        ("64KiB", 64 * 1024),
        ("1GiB", 1024**3),
        ("1gib", 1024**3),
        ("10kb", 10_000),
        ("2MB", 2_000_000),
        ("65536", 65536),
        ("100b", 100),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert build(SINK__BATCH__MAX_BYTES=text).batch.max_bytes == size
    assert build({"events": {"max_event_bytes": text}}).events.max_event_bytes == size


def test_numbers_are_accepted_as_seconds_and_bytes() -> None:
    cfg = build({"batch": {"max_wait": 2, "max_bytes": 1024}})
    assert cfg.batch.max_wait == 2.0
    assert cfg.batch.max_bytes == 1024


# String-typed settings whose environment value looks like another YAML type, or holds a
# YAML comment marker: the value must arrive as written.
@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("SINK__KAFKA__GROUP_ID", "12345"),
        ("SINK__KAFKA__CLIENT_ID", "on"),
        ("SINK__KAFKA__SASL_PASSWORD", "123456"),
        ("SINK__KAFKA__SASL_PASSWORD", "pa ss #word"),
        ("SINK__KAFKA__SASL_PASSWORD", "#s3cret"),
        ("SINK__KAFKA__SASL_PASSWORD", "key: value"),
    ],
)
def test_env_string_values_arrive_as_written(name: str, raw: str) -> None:
    cfg = build(SINK__KAFKA__SASL_MECHANISM="PLAIN", **{name: raw})
    section, key = name.removeprefix("SINK__").lower().split("__")
    value = getattr(getattr(cfg, section), key)
    assert value is not None
    shown = value.get_secret_value() if hasattr(value, "get_secret_value") else value
    assert shown == raw


# --- errors ---------------------------------------------------------------------------------


def test_config_error_is_a_sink_error() -> None:
    assert issubclass(ConfigError, SinkError)
    assert not ConfigError.retriable


@pytest.mark.parametrize(
    ("data", "key", "value", "expected"),
    [
        ({"batch": {"max_rows": -1}}, "batch.max_rows", "-1", "greater than 0"),
        ({"batch": {"max_rows": 0}}, "batch.max_rows", "0", "greater than 0"),
        ({"batch": {"max_rows": "many"}}, "batch.max_rows", "'many'", "integer"),
        ({"http": {"port": 70000}}, "http.port", "70000", "less than or equal to 65535"),
        (
            {"kafka": {"auto_offset_reset": "newest"}},
            "kafka.auto_offset_reset",
            "'newest'",
            "'earliest' or 'latest'",
        ),
        ({"kafka": {"topics_regex": "(om_"}}, "kafka.topics_regex", "'(om_'", "regular expression"),
        ({"kafka": {"topics": []}}, "kafka.topics", "[]", "non-empty list"),
        ({"kafka": {"topics": ["a", " "]}}, "kafka.topics", "' '", "non-empty list"),
        ({"batch": {"max_wait": "soon"}}, "batch.max_wait", "'soon'", "duration"),
        ({"batch": {"max_wait": "0s"}}, "batch.max_wait", "'0s'", "greater than 0"),
        ({"batch": {"max_bytes": "16 furlongs"}}, "batch.max_bytes", "'16 furlongs'", "size"),
        ({"dedup": {"on_error": "ignore"}}, "dedup.on_error", "'ignore'", "'block'"),
        (
            {"clickhouse": {"events_table": "events; DROP"}},
            "clickhouse.events_table",
            "'events; DROP'",
            "plain table name",
        ),
        ({"clickhouse": {"compression": "gzip"}}, "clickhouse.compression", "'gzip'", "lz4"),
    ],
)
def test_error_names_key_value_and_expectation(
    data: dict[str, Any], key: str, value: str, expected: str
) -> None:
    message = error(data)
    line = next(line for line in message.splitlines() if line.strip().startswith(key))
    assert f"{key} = " in line
    assert value in line
    assert expected in line


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"kafka": {"group_idd": "x"}}, "kafka.group_idd"),
        ({"batch": {"max_row": 1}}, "batch.max_row"),
        ({"batches": {"max_rows": 1}}, "batches"),
    ],
)
def test_unknown_keys_are_named(data: dict[str, Any], key: str) -> None:
    line = next(line for line in error(data).splitlines() if line.strip().startswith(key))
    assert f"{key} = " in line
    assert "Extra inputs are not permitted" in line


def test_every_error_is_reported_at_once() -> None:
    message = error({"batch": {"max_rows": -1}, "kafka": {"auto_offset_reset": "x"}})
    assert "batch.max_rows" in message
    assert "kafka.auto_offset_reset" in message


def test_env_value_errors_name_the_key() -> None:
    line = next(
        line for line in error(SINK__BATCH__MAX_ROWS="-1").splitlines() if "batch.max_rows" in line
    )
    assert "batch.max_rows = " in line
    assert "-1" in line
    assert "greater than 0" in line


def test_in_flight_must_hold_a_batch() -> None:
    message = error({"batch": {"max_rows": 1000, "max_in_flight": 999}})
    assert "batch.max_in_flight (999)" in message
    assert "batch.max_rows (1000)" in message
    assert build({"batch": {"max_rows": 1000, "max_in_flight": 1000}}).batch.max_in_flight == 1000


def test_in_flight_default_is_checked_against_max_rows() -> None:
    assert "max_in_flight" in error(SINK__BATCH__MAX_ROWS="300000")


@pytest.mark.parametrize(
    "url",
    [
        "http://admin:hunter2@ch.internal:8123/db",
        "tcp://admin:hunter2@ch.internal:9000",
        "admin:hunter2@ch.internal",
    ],
)
def test_clickhouse_url_scheme(url: str) -> None:
    message = error({"clickhouse": {"url": url}})
    assert "clickhouse.url" in message
    assert "clickhouse://" in message  # what was expected
    assert "hunter2" not in message
    assert url not in message


@pytest.mark.parametrize("scheme", ["clickhouse", "clickhouses"])
def test_clickhouse_url_schemes_accepted(scheme: str) -> None:
    url = f"{scheme}://u:p@h:9000/db"
    assert build({"clickhouse": {"url": url}}).clickhouse.url.get_secret_value() == url


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"clickhouse": {"url": "http://admin:hunter2@h/db"}}, "clickhouse.url"),
        ({"clickhouse": {"url": ["hunter2"]}}, "clickhouse.url"),
        ({"dedup": {"redis_url": ["redis://:hunter2@h"]}}, "dedup.redis_url"),
        ({"dedup": {"redis_url": {"hunter2": 1}}}, "dedup.redis_url"),
        ({"kafka": {"sasl_password": ["hunter2"]}}, "kafka.sasl_password"),
        ({"kafka": {"sasl_password": {"hunter2": 1}}}, "kafka.sasl_password"),
    ],
)
def test_secrets_are_not_shown(data: dict[str, Any], key: str) -> None:
    message = error(data)
    assert key in message
    assert "hunter2" not in message
    assert "<hidden>" in message


def test_secrets_are_not_shown_with_other_errors() -> None:
    message = error(
        {
            "batch": {"max_rows": -1},
            "kafka": {"sasl_password": 123456789},
            "clickhouse": {"url": "http://x:987654321@h"},
        }
    )
    assert "batch.max_rows = -1" in message
    assert "123456789" not in message
    assert "987654321" not in message


def test_secrets_are_hidden_in_repr_of_a_valid_config() -> None:
    cfg = build(
        {
            "clickhouse": {"url": "clickhouse://u:hunter2@h:9000/db"},
            "dedup": {"redis_url": "redis://:hunter2@h:6379/0"},
            "kafka": {"sasl_password": "hunter2"},
        }
    )
    assert "hunter2" not in repr(cfg)
    assert "hunter2" not in str(cfg.model_dump())
    assert cfg.kafka.sasl_password is not None
    assert cfg.kafka.sasl_password.get_secret_value() == "hunter2"


@pytest.mark.parametrize(
    "data",
    [
        {"clickhouse": {"uri": "clickhouse://admin:hunter2@h:9000/db"}},
        {"kafka": {"sasl_pass": "hunter2"}},
        {"dedup": "redis://:hunter2@h:6379/0"},
    ],
)
def test_values_of_misspelt_or_misplaced_secrets_are_not_shown(data: dict[str, Any]) -> None:
    assert "hunter2" not in error(data)


def test_a_cluster_configuration_is_checked() -> None:
    cfg = config.build(
        {"clickhouse": {"cluster": "sink_cluster", "nodes": [["a:9000", "b:9000"], ["c:9000"]]}}
    )
    assert cfg.clickhouse.nodes == (("a:9000", "b:9000"), ("c:9000",))
    with pytest.raises(ConfigError, match=r"nodes is given without clickhouse\.cluster"):
        config.build({"clickhouse": {"nodes": [["a:9000"]]}})
    with pytest.raises(ConfigError, match=r"shard_by: namespace"):
        config.build(
            {
                "clickhouse": {"cluster": "c", "shard_by": "namespace"},
                "events": {"namespace_header": "ns"},
            }
        )
    with pytest.raises(ConfigError, match="zookeeper_path"):
        config.build({"clickhouse": {"zookeeper_path": "relative/path"}})
