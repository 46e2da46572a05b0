"""Fixtures of the per-example tests: a spy on the fast engine's fallback; the rule registry kept as found."""

from __future__ import annotations

import pytest

from gns_sweep.per_example.rules import RULES


@pytest.fixture
def fallback_names(monkeypatch):
    """The parameter names each call sent to the fallback (torch.func, or the loop where it fails)."""
    import gns_sweep.per_example.fast as fast

    seen: list[tuple[str, ...]] = []

    def spy(stats, model, inputs, targets, loss, layout, groups, **kwargs):
        seen.append(tuple(layout.names[g] for g in groups))
        return real(stats, model, inputs, targets, loss, layout, groups, **kwargs)

    real = fast._fallback
    monkeypatch.setattr(fast, "_fallback", spy)
    return seen


@pytest.fixture(autouse=True)
def rules_left_as_found():
    """Each test must leave the registry of rules as it found it; it is put back either way, so a test
    that fails with a rule registered does not change the rules of the tests after it."""
    before = dict(RULES)
    yield
    after = dict(RULES)
    RULES.clear()
    RULES.update(before)
    assert after == before, "a test left a rule registered"
