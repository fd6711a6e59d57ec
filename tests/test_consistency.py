"""``broker.vault.consistency``: which X-Vault-Index a client sends back."""

from __future__ import annotations

import base64
import json

import pytest

from broker.vault.consistency import StateIndex

pytestmark = pytest.mark.unit


def marker(value: int, cluster: str = "c1") -> str:
    return base64.b64encode(json.dumps({"cluster": cluster, "value": str(value)}).encode()).decode()


def test_nothing_is_sent_before_an_answer_carried_a_marker() -> None:
    index = StateIndex()
    index.observe("")
    assert index.headers() == []


def test_the_newest_state_wins_even_when_answers_cross() -> None:
    index = StateIndex()
    index.observe(marker(40))
    index.observe(marker(35))  # an older answer arriving late
    assert index.headers() == [
        ("X-Vault-Index", marker(40)),
        ("X-Vault-Inconsistent", "forward-active-node"),
    ]
    index.observe(marker(41))
    assert index.headers()[0] == ("X-Vault-Index", marker(41))


def test_another_cluster_or_an_opaque_marker_replaces_the_kept_one() -> None:
    index = StateIndex()
    index.observe(marker(40))
    index.observe(marker(3, "c2"))  # a rebuilt cluster: its numbers start again
    assert index.headers()[0] == ("X-Vault-Index", marker(3, "c2"))
    index.observe("opaque-marker")
    assert index.headers()[0] == ("X-Vault-Index", "opaque-marker")
