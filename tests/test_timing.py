"""The transfer-time breakdown (semalign.suite.timing): exclusive time per section, off unless enabled."""
from __future__ import annotations

import time

import pytest

from semalign.suite import timing


@pytest.fixture(autouse=True)
def _off():
    yield
    timing._totals = None  # other tests run with timing off, as the workflow does
    timing._stack.clear()


def test_nested_sections_charge_exclusive_time():
    timing.enable()
    with timing.section("loss"):
        time.sleep(0.05)
        with timing.section("teacher logits"):
            time.sleep(0.10)
        with timing.section("student forward"):
            time.sleep(0.02)
    with timing.section("teacher logits"):
        time.sleep(0.03)
    t = timing.totals()
    assert t["loss"] == pytest.approx(0.05, abs=0.02)  # not 0.17: the nested sections are charged to themselves
    assert t["teacher logits"] == pytest.approx(0.13, abs=0.03)
    assert t["student forward"] == pytest.approx(0.02, abs=0.02)
    timing.enable()  # enabling again resets
    assert timing.totals() == {}


def test_off_by_default_records_nothing_and_unknown_names_fail_only_when_on():
    with timing.section("no such section"):  # off: a bare yield
        pass
    assert timing.totals() == {}
    timing.enable()
    with pytest.raises(ValueError, match="unknown timing section"):
        with timing.section("no such section"):
            pass
