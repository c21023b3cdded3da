"""Runners in the order they are next free, by kind and by model held: how the planner finds a job's
runner at fleet scale without weighing every runner for every job.

A job's best runner is the one where it would finish first: when the runner is free, plus loading
the model there (nothing where it is held, a copy where its node has it staged, a disk read
elsewhere), plus the run. Runners of one *kind* (device name, CPU or GPU, families) run a job
equally fast, so within a kind only three lists matter, each in the order the runners are free:
those holding the model, those whose node has it staged, and the rest (*cold*). The best is the
first of one of them (or one tied with it), so with a thousand runners the planner weighs a
handful per job (planner.py). The cold lists are made for a model the first time one is asked
for, and kept from then on.

Plain runners (one device, sharing it with no other runner) are listed. Gangs, and the runners on
a gang's devices, are *special*: their time depends on each other's batches and on which of them a
batch takes, so the planner weighs each of them for every job, as before; a fleet has few.

The lists are kept up to date by ``State.touch``, which every change to a runner's batch, models or
capabilities goes through; ``State.check_index`` says whether they agree with the runners (for the tests).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

# What makes runners interchangeable for the planner: device name, on a GPU, the families it runs.
Kind = tuple[str, bool, tuple[str, ...]]
IDLE = float("-inf")  # the sort key of a runner with no batch: free now, whatever now is


class RunnerIndex:
    def __init__(self) -> None:
        self.kinds: dict[Kind, list[tuple[float, str]]] = {}  # plain runners of a kind, by (busy until, name)
        self.holders: dict[tuple[Kind, str], list[tuple[float, str]]] = {}  # the same, those sure to hold a model
        self.staged: dict[tuple[Kind, str], list[tuple[float, str]]] = {}  # not holding it, their node has it staged
        self.cold: dict[tuple[Kind, str], list[tuple[float, str]]] = {}  # neither holding it nor staged
        self._cold_models: set[str] = set()
        self.special: set[str] = set()
        self._at: dict[str, tuple[Kind, tuple[float, str], frozenset[str], frozenset[str]]] = {}  # where it is listed

    def put(self, name: str, kind: Kind, busy_until: float, holds: Iterable[str], staged: Iterable[str]) -> None:
        """Lists a plain runner (again): its kind, when its batch is expected to end (``IDLE``: none), the
        models sure to be on it then, and those its node has staged (or is staging)."""
        key, holds = (busy_until, name), frozenset(holds)
        staged = frozenset(staged) - holds
        listed = self._at.get(name)
        if listed == (kind, key, holds, staged):
            return
        self.drop(name)
        self._at[name] = (kind, key, holds, staged)
        bisect.insort(self.kinds.setdefault(kind, []), key)
        for model in holds:
            bisect.insort(self.holders.setdefault((kind, model), []), key)
        for model in staged:
            bisect.insort(self.staged.setdefault((kind, model), []), key)
        for model in self._cold_models - holds - staged:
            bisect.insort(self.cold.setdefault((kind, model), []), key)

    def cold_of(self, kind: Kind, model: str) -> list[tuple[float, str]]:
        """The plain runners of the kind that neither hold the model nor have it staged, free first."""
        if model not in self._cold_models:
            self._cold_models.add(model)
            for k, key, holds, staged in self._at.values():
                if model not in holds and model not in staged:
                    self.cold.setdefault((k, model), []).append(key)
            for (_, m), entries in self.cold.items():
                if m == model:
                    entries.sort()
        return self.cold.get((kind, model), [])

    def put_special(self, name: str) -> None:
        self.drop(name)
        self.special.add(name)

    def drop(self, name: str) -> None:
        self.special.discard(name)
        listed = self._at.pop(name, None)
        if listed is None:
            return
        kind, key, holds, staged = listed
        _remove(self.kinds, kind, key)
        for model in holds:
            _remove(self.holders, (kind, model), key)
        for model in staged:
            _remove(self.staged, (kind, model), key)
        for model in self._cold_models - holds - staged:
            _remove(self.cold, (kind, model), key)

    def listed(self, name: str) -> tuple[Kind, tuple[float, str], frozenset[str], frozenset[str]] | None:
        return self._at.get(name)


def _remove(lists: dict, at: object, key: tuple[float, str]) -> None:
    entries = lists[at]
    del entries[bisect.bisect_left(entries, key)]
    if not entries:
        del lists[at]
