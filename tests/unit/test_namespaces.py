"""The customer namespace of a record: header, else the topic regex, else the topic name."""

from __future__ import annotations

import pytest

from sink.config import KafkaConfig
from sink.pipeline.consumer import Namespaces

DEFAULT_REGEX = KafkaConfig().topics_regex


@pytest.mark.parametrize(
    ("topic", "namespace"),
    [
        ("om_acme_events", "acme"),
        ("om_a_events", "a"),
        ("om_acme_corp_events", "acme_corp"),
        ("om_x_events_events", "x_events"),
    ],
)
def test_default_regex_gives_the_namespace(topic: str, namespace: str) -> None:
    assert DEFAULT_REGEX == r"^om_(?P<namespace>.+)_events$"
    assert Namespaces(DEFAULT_REGEX, None).of_topic(topic) == namespace


@pytest.mark.parametrize("topic", ["orders", "om__events", "om_acme_events_v2", "xom_acme_events"])
def test_non_matching_topic_gives_the_topic_name(topic: str) -> None:
    assert Namespaces(DEFAULT_REGEX, None).of_topic(topic) == topic


def test_regex_without_namespace_group_gives_the_topic_name() -> None:
    assert Namespaces(r"^om_.+_events$", None).of_topic("om_acme_events") == "om_acme_events"


def test_custom_regex() -> None:
    namespaces = Namespaces(r"^usage\.(?P<namespace>[a-z]+)\.v\d+$", None)
    assert namespaces.of_topic("usage.globex.v2") == "globex"


def test_of_record_without_header_config_uses_the_topic() -> None:
    namespaces = Namespaces(DEFAULT_REGEX, None)
    assert namespaces.of_record("om_acme_events", [("namespace", b"other")]) == "acme"


def test_header_wins_when_configured_and_present() -> None:
    namespaces = Namespaces(DEFAULT_REGEX, "x-namespace")
    headers = [("trace", b"abc"), ("x-namespace", b"globex")]
    assert namespaces.of_record("om_acme_events", headers) == "globex"


@pytest.mark.parametrize(
    "headers",
    [None, [], [("other", b"globex")], [("x-namespace", b"")], [("X-Namespace", b"globex")]],
    ids=["none", "empty", "other-header", "empty-value", "other-case"],
)
def test_topic_is_used_when_the_header_is_absent_or_empty(
    headers: list[tuple[str, bytes]] | None,
) -> None:
    namespaces = Namespaces(DEFAULT_REGEX, "x-namespace")
    assert namespaces.of_record("om_acme_events", headers) == "acme"


def test_header_value_is_utf8() -> None:
    namespaces = Namespaces(DEFAULT_REGEX, "ns")
    assert namespaces.of_record("t", [("ns", "ünïcode".encode())]) == "ünïcode"
    assert namespaces.of_record("t", [("ns", b"bad\xff")]) == "bad\ufffd"


def test_lookup_is_stable_per_topic() -> None:
    namespaces = Namespaces(DEFAULT_REGEX, None)
    assert namespaces.of_topic("om_a_events") == namespaces.of_topic("om_a_events") == "a"
    assert namespaces.of_topic("om_b_events") == "b"
