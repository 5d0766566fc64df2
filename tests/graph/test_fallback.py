"""The fallback's memory of which accounts go through Graph, and what counts as SMTP AUTH off."""

from __future__ import annotations

import logging

import pytest

from proxy import metrics
from proxy.graph.fallback import FallbackState, is_smtp_auth_disabled
from proxy.graph.settings import Fallback


def switches(direction: str) -> float:
    value = metrics.REGISTRY.get_sample_value("xoauth2_proxy_graph_fallback_switches_total",
                                              {"upstream": "smtp", "direction": direction})
    return value or 0.0


def test_recognises_smtp_auth_disabled() -> None:
    text = ("5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
            "Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.")
    assert is_smtp_auth_disabled("5.7.139", text)
    assert is_smtp_auth_disabled(None, "535 " + text[8:])
    assert not is_smtp_auth_disabled("5.7.3", "5.7.3 Authentication unsuccessful")


def test_one_event_per_switch_and_a_retry_after_the_period(
        caplog: pytest.LogCaptureFixture) -> None:
    state = FallbackState("smtp", Fallback("graph", retry_seconds=100))
    before = switches("to_graph")
    with caplog.at_level(logging.INFO, "proxy.graph"):
        assert not state.via_graph("a@x.example", now=0)
        state.switched("a@x.example", "535 5.7.139", now=0)
        for moment in (1, 50, 99):
            assert state.via_graph("a@x.example", now=moment)
        assert not state.via_graph("a@x.example", now=100)  # time to try SMTP again
        state.switched("a@x.example", "535 5.7.139", now=100)  # still off: no new event
        assert state.via_graph("a@x.example", now=150)
        assert not state.via_graph("b@x.example", now=150)
        state.recovered("a@x.example")
        state.recovered("a@x.example")
    assert [r.getMessage() for r in caplog.records] == ["graph_fallback", "graph_fallback_ended"]
    assert switches("to_graph") == before + 1
    assert not state.via_graph("a@x.example", now=151)
