"""The runner's resident models (atelier.resident.ResidentSet) on fake models: which it evicts, and when."""

from __future__ import annotations

import subprocess
import sys

import pytest

from atelier.resident import DeviceBudgetError, ResidentSet
from tests.conftest import ROOT


def _filled(budget: int, max_models: int, *sizes: tuple[str, int]) -> ResidentSet:
    models = ResidentSet(budget, max_models)
    for name, size in sizes:
        models.add(name, object(), size)
    return models


def test_room_is_made_by_evicting_the_least_recently_used_first() -> None:
    models = _filled(100, 5, ("a", 40), ("b", 30), ("c", 20))
    assert models.get("a") is not None  # now the most recently used: b goes first, then c
    assert models.make_room("d", 50, keep_slot=True) == ["b", "c"]
    assert models.bytes == {"a": 40}
    assert models.make_room("d", 60, keep_slot=True) == []  # 40 + 60 fits exactly


def test_a_slot_is_kept_for_the_model_being_loaded() -> None:
    models = _filled(1000, 2, ("a", 1), ("b", 1))
    assert models.make_room("c", 0, keep_slot=False) == []  # two models, two allowed
    assert models.make_room("c", 0, keep_slot=True) == ["a"]
    assert list(models.bytes) == ["b"]


def test_adding_a_model_evicts_what_its_measured_size_does_not_leave_room_for() -> None:
    models = _filled(100, 5, ("a", 30), ("b", 30))
    evicted = models.add("c", object(), 60)  # room was made for less than it turned out to take
    assert evicted == ["a"]
    assert models.bytes == {"b": 30, "c": 60}
    assert "c" in models and "a" not in models and len(models) == 2


def test_a_model_larger_than_the_budget_is_refused_and_evicts_nothing() -> None:
    models = _filled(100, 5, ("a", 10))
    with pytest.raises(DeviceBudgetError, match="needs 101 bytes on the device, more than its budget of 100"):
        models.make_room("huge", 101, keep_slot=True)
    assert models.bytes == {"a": 10}


def test_out_of_memory_keeps_only_the_newest_and_clear_drops_all() -> None:
    models = _filled(100, 5, ("a", 10), ("b", 10), ("c", 10))
    models.get("a")
    assert models.keep_newest() == ["b", "c"]
    assert models.keep_newest() == []  # one model left: nothing more to free
    assert models.clear() == ["a"]
    assert len(models) == 0 and models.get("a") is None


def test_it_imports_without_torch() -> None:
    code = "import sys, atelier.resident; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
