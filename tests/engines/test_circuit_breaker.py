"""The OpenAI engine's circuit breaker as a table of events (a fake clock; no server needed)."""

import pytest

from selfdistill.engines.openai_compat import CircuitBreaker
from selfdistill.errors import EngineError


def test_opens_after_n_failures_then_half_opens():
    now = [0.0]
    cb = CircuitBreaker(3, 10.0, clock=lambda: now[0])
    for _ in range(3):
        cb.check("u")
        cb.record(False)
    with pytest.raises(EngineError, match="circuit open after 3 failures"):
        cb.check("u")
    now[0] = 11.0
    cb.check("u")  # half-open: one trial goes through
    cb.record(False)  # ... and fails: open again at once
    with pytest.raises(EngineError):
        cb.check("u")


def test_a_late_success_closes_an_open_circuit():
    cb = CircuitBreaker(2, 60.0, clock=lambda: 0.0)
    cb.record(False)
    cb.record(False)
    with pytest.raises(EngineError):
        cb.check("u")
    cb.record(True)  # a request sent before the circuit opened came back fine
    cb.check("u")  # closed: no "open after 0 failures" message is possible
