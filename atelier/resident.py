"""The models a runner keeps on its device: within a budget in bytes and a number of models, least
recently used first out. The runner's counterpart of the loader's ``StagedSet``.

It holds what it is given (a ``LoadedModel`` in a runner, anything in a test) and knows only their
sizes: torch-free, and it frees no memory itself. Each method that evicts returns the names it
evicted, for the runner to log and to hand the memory back to the device.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


class DeviceBudgetError(ValueError):
    """A model larger than the whole device budget: no eviction makes it fit."""


@dataclass
class Resident:
    model: Any
    bytes: int


class ResidentSet:
    def __init__(self, budget: int, max_models: int, *, device: str = "the device"):
        self.budget = budget
        self.max_models = max_models
        self.device = device  # only for messages
        self._items: OrderedDict[str, Resident] = OrderedDict()  # least recently used first

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> dict[str, int]:
        """Each model's bytes on the device, least recently used first."""
        return {name: r.bytes for name, r in self._items.items()}

    @property
    def used(self) -> int:
        return sum(r.bytes for r in self._items.values())

    def get(self, name: str) -> Any | None:
        """The resident model ``name``, now the most recently used; None when it is not resident."""
        resident = self._items.get(name)
        if resident is None:
            return None
        self._items.move_to_end(name)
        return resident.model

    def make_room(self, name: str, incoming: int, *, keep_slot: bool, free: int | None = None,
                  reserve: int = 0) -> list[str]:
        """Evicts least recently used models until ``incoming`` more bytes (and, with ``keep_slot``, one
        more model) fit the budget; returns the evicted. A model alone larger than the budget is a
        ``DeviceBudgetError``, and evicts nothing.

        ``free``: the device memory free now (measured). Then also until it, with the bytes of the models
        evicted, covers ``incoming`` and ``reserve``: the budget counts weights alone, not what else holds
        the device (contexts, workspaces, graph pools, other processes)."""
        if incoming > self.budget:
            raise DeviceBudgetError(f"model {name} needs {incoming:,} bytes on {self.device}, "
                                    f"more than its budget of {self.budget:,} bytes")
        most = self.max_models - (1 if keep_slot else 0)
        evicted = []
        freed = 0
        for other in [n for n in self._items if n != name]:  # oldest first
            fits = self.used + incoming <= self.budget and len(self._items) <= most
            if fits and (free is None or free + freed >= incoming + reserve):
                break
            freed += self._items.pop(other).bytes
            evicted.append(other)
        return evicted

    def add(self, name: str, model: Any, nbytes: int) -> list[str]:
        """Keeps ``model`` as the most recently used, at its measured size; returns what that evicted
        (room was made for its expected size before it loaded, and the two may differ)."""
        self._items[name] = Resident(model, nbytes)
        self._items.move_to_end(name)
        return self.make_room(name, 0, keep_slot=False)

    def keep_newest(self) -> list[str]:
        """Evicts all but the most recently used model (after running out of device memory: the others'
        memory may be what the next job needs); returns the evicted."""
        evicted = list(self._items)[:-1]
        for name in evicted:
            del self._items[name]
        return evicted

    def evict_oldest(self) -> list[str]:
        """Evicts the least recently used model (the device needs memory the accounting does not see);
        returns it, or [] when none is resident."""
        if not self._items:
            return []
        name, _ = self._items.popitem(last=False)
        return [name]

    def discard(self, name: str) -> bool:
        """Evicts one model (its catalog entry changed); False when it was not resident."""
        return self._items.pop(name, None) is not None

    def clear(self) -> list[str]:
        """Evicts every model; returns them by name."""
        evicted = list(self._items)
        self._items.clear()
        return evicted
