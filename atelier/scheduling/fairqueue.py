"""The queue of waiting jobs: strict priority between classes, a fair share between users within one.

Within a priority class every user has a FIFO of their own and a *virtual time*: the work of
their jobs that has started, in work units (see ``work_units``). The next job to start is the
head of the user with the least virtual time, the older head first on a tie. So a user who
queues a hundred jobs and one who queues one take turns, and the second waits for at most
one of the first's jobs, not for all of them.

A user who comes back after having nothing queued starts at the least virtual time of
those waiting (or where the class's clock stands), never at their old, lower value: being
away banks no credit. This is start-time fair queuing; it gives each backlogged user an
equal share of the work started, the same guarantee as deficit round robin, without a
quantum to tune.

The queue is pure bookkeeping: no clock, no sockets. ``order`` says in what order the jobs
would start if nothing else arrived, without changing anything; ``take`` is the start.

It is built to stay cheap with a thousand users and a hundred thousand jobs: each class keeps a
heap of its users by (virtual time, head's arrival), so finding who goes next, or where a
returning user starts, never looks at every user. The heap is lazy: a user whose key changes
gets a new entry and the old one is skipped when met (and dropped when the heap is rebuilt, once
stale entries outnumber the live ones). ``order`` walks the heap without popping it, so the
first ``limit`` jobs cost about ``limit`` heap steps, however many users wait.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Entry:
    """What the queue knows of a job."""

    id: str
    user: str
    priority: int  # 0 goes first
    cost: float  # work units: what starting this job charges its user
    seq: int  # arrival order; a requeued job keeps its own


@dataclass
class _User:
    jobs: deque[Entry] = field(default_factory=deque)
    vtime: float = 0.0
    key: tuple[float, int, str] | None = None  # its live entry in the class's heap; None: nothing queued


@dataclass
class _Class:
    users: dict[str, _User] = field(default_factory=dict)
    clock: float = 0.0  # the virtual time at which the last job of this class started
    # (virtual time, head's seq, user) of every user with jobs queued, and stale entries: see the module's docstring.
    heap: list[tuple[float, int, str]] = field(default_factory=list)

    def rekey(self, name: str, user: _User) -> None:
        """The user's jobs or virtual time changed: its heap entry follows."""
        key = (user.vtime, user.jobs[0].seq, name) if user.jobs else None
        if key != user.key:
            user.key = key
            if key is not None:
                heapq.heappush(self.heap, key)
                if len(self.heap) > 2 * len(self.users) + 64:
                    self.heap = [u.key for u in self.users.values() if u.key is not None]
                    heapq.heapify(self.heap)

    def live(self, key: tuple[float, int, str]) -> bool:
        user = self.users.get(key[2])
        return user is not None and user.key == key

    def least_vtime(self) -> float | None:
        """The least virtual time of the users with jobs queued (stale entries at the top are dropped)."""
        heap = self.heap
        while heap and not self.live(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None


class FairQueue:
    """Jobs waiting to start. With ``fair=False`` it is one FIFO in arrival order (a baseline)."""

    def __init__(self, *, fair: bool = True):
        self.fair = fair
        self._classes: dict[int, _Class] = {}
        self._entries: dict[str, Entry] = {}
        self._per_user: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._entries

    def __getitem__(self, job_id: str) -> Entry:
        return self._entries[job_id]

    def queued_by(self, user: str) -> int:
        return self._per_user[user]

    def push(self, entry: Entry, *, front: bool = False) -> None:
        """Queues a job; ``front`` puts it before its user's other jobs (it waited its turn already)."""
        if entry.id in self._entries:
            raise ValueError(f"job {entry.id} is queued already")
        cls = self._classes.get(self._class_of(entry))
        if cls is None:
            cls = self._classes[self._class_of(entry)] = _Class()
        user = cls.users.get(self._user_of(entry))
        if user is None:
            user = cls.users[self._user_of(entry)] = _User()
        if not user.jobs:
            # Back from having nothing queued: start where the others are, not where it left off.
            least = cls.least_vtime()
            user.vtime = max(user.vtime, least if least is not None else cls.clock)
        if front:
            user.jobs.appendleft(entry)
        else:
            user.jobs.append(entry)
        cls.rekey(self._user_of(entry), user)
        self._entries[entry.id] = entry
        self._per_user[entry.user] += 1

    def remove(self, job_id: str) -> Entry:
        """Takes a job out without starting it (cancelled, superseded): nobody is charged."""
        entry = self._entries.pop(job_id)
        cls = self._classes[self._class_of(entry)]
        name = self._user_of(entry)
        user = cls.users[name]
        user.jobs.remove(entry)
        cls.rekey(name, user)
        self._forget_idle(cls, name)
        self._per_user[entry.user] -= 1
        if not self._per_user[entry.user]:
            del self._per_user[entry.user]
        return entry

    def take(self, job_id: str) -> Entry:
        """Takes a job out to start it: its user is charged its cost."""
        entry = self._entries[job_id]
        cls = self._classes[self._class_of(entry)]
        user = cls.users[self._user_of(entry)]
        cls.clock = max(cls.clock, user.vtime)
        user.vtime += entry.cost  # remove() re-keys the user
        return self.remove(job_id)

    def refund(self, entry: Entry) -> None:
        """Gives back what starting ``entry`` cost its user (it is queued again: the run did not count)."""
        cls = self._classes.get(self._class_of(entry))
        if cls is not None and self._user_of(entry) in cls.users:
            user = cls.users[self._user_of(entry)]
            user.vtime = max(0.0, user.vtime - entry.cost)
            cls.rekey(self._user_of(entry), user)

    def order(self, limit: int | None = None) -> list[Entry]:
        """The jobs in the order they would start if each started in turn, as ``take`` charges them."""
        return list(self._iter_order(limit))

    def _iter_order(self, limit: int | None) -> Iterator[Entry]:
        emitted = 0
        for priority in sorted(self._classes):
            cls = self._classes[priority]
            # The frontier of a walk down the class's heap (node ``at``: its children come next) and of each
            # user's later jobs (``at`` < 0: the user's job -at): (vtime, seq, user, at).
            tree, met = cls.heap, set()
            frontier = [(*tree[0], 0)] if tree else []
            while frontier:
                if limit is not None and emitted >= limit:
                    return
                vtime, seq, name, at = heapq.heappop(frontier)
                if at >= 0:
                    for child in (2 * at + 1, 2 * at + 2):
                        if child < len(tree):
                            heapq.heappush(frontier, (*tree[child], child))
                    if name in met or not cls.live(tree[at]):
                        continue  # stale, or a second entry of the same key
                    met.add(name)
                    index = 0
                else:
                    index = -at
                jobs = cls.users[name].jobs
                entry = jobs[index]
                yield entry
                emitted += 1
                if index + 1 < len(jobs):
                    heapq.heappush(frontier, (vtime + entry.cost, jobs[index + 1].seq, name, -(index + 1)))

    # The FIFO baseline is one class and one "user": arrival order and nothing else.

    def _class_of(self, entry: Entry) -> int:
        # Below 0: an operator's front lane (scheduling/controls.py), ahead in either policy.
        return entry.priority if self.fair or entry.priority < 0 else 0

    def _user_of(self, entry: Entry) -> str:
        return entry.user if self.fair else ""

    def _forget_idle(self, cls: _Class, name: str) -> None:
        # An idle user's virtual time only matters while it is above the clock (push takes the max).
        user = cls.users[name]
        if not user.jobs and user.vtime <= cls.clock:
            del cls.users[name]

    def vtime(self, user: str, priority: int) -> float:
        """A user's virtual time in a class (for tests and status)."""
        cls = self._classes.get(priority if self.fair else 0)
        key = user if self.fair else ""
        return cls.users[key].vtime if cls and key in cls.users else 0.0
