"""An operator's controls over the queue: pause, drain, reorder, reload the catalog.

Pure, like the rest of the policy: the policy holds one ``Controls`` and asks it, on every plan,
which runners may take work (``usable``) and which models' jobs may start (``held_models``);
the operator's calls (``pause``, ``drain``, ``to_front``, ``set_priority``, ``reload``) change it
and the policy's state, and return what the scheduler actor is to say. No sockets, no clock.

What each control means:

- Pause (the whole queue, or one model): nothing new starts; what runs finishes. Queued jobs stay
  queued, in their order, and say why they wait (``reason``); submits are still taken. Resume
  starts them in that same order: a pause changes no one's place or fair share.
- Drain a node (maintenance): its runners finish what they run and take nothing new. It is
  ``draining`` while one of them still has a batch, ``drained`` once all are idle. A job whose
  model only that node runs waits. Not a runner's own shutdown drain (``Runner.draining``): that
  one ends with the process; this one lasts until the operator resumes the node.
- To the front: the job starts next, before every other queued job whatever its class (an
  operator's word beats the priority classes); several moved keep the order they were moved in,
  the first moved first. It is a class of its own, ahead of ``live`` (``FRONT_CLASS``): its owner is
  not charged for it in their own class, which is the point of being moved.
- A priority change: a queued job only, into the class's queue as if it had arrived there.
- A catalog reload: added models are served; a changed one's resident and staged copies are
  forgotten (the runners and loaders drop theirs); a removed one's queued jobs fail with the
  reason, and its running ones finish.

``settings``/``restore`` turn the lasting part (pauses, drains, the front lane's order) into JSON
for the journal, so that a restart keeps what an operator decided.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from atelier.config import Config, ModelEntry
from atelier.jobs import ErrorCode, JobState, Priority
from atelier.scheduling.admission import Refused
from atelier.scheduling.state import PRIORITY_CLASS, Announce, Job, Runner, State

NodeState = Literal["serving", "draining", "drained"]
# The front lane: one class per moved job, below every priority class (0 is live), in the order moved.
FRONT_CLASS = -(1 << 40)
QUEUE_PAUSED = "the queue is paused by an operator"


def model_paused(model: str) -> str:
    return f"model {model} is paused by an operator"


def model_removed(model: str) -> str:
    return f"model {model} was removed from the catalog by an operator"


def node_drained(nodes: Iterable[str], model: str) -> str:
    named = ", ".join(sorted(nodes))
    return f"waiting for node {named}, drained for maintenance by an operator: no other node runs model {model}"


@dataclass(frozen=True)
class CatalogChange:
    """What a reload changed, by model name, each list sorted."""

    added: list[str]
    changed: list[str]
    removed: list[str]
    failed: list[Job] = field(default_factory=list)  # queued jobs of removed models, failed now


@dataclass
class Controls:
    paused: bool = False
    paused_models: set[str] = field(default_factory=set)
    draining: set[str] = field(default_factory=set)  # nodes, draining or drained
    drained: set[str] = field(default_factory=set)  # of ``draining``, those said to be drained
    removed: set[str] = field(default_factory=set)  # models taken out by a reload: their returning jobs fail
    explained: dict[str, str] = field(default_factory=dict)  # job id -> the reason it was given here
    _moves: itertools.count = field(default_factory=itertools.count)
    _explained_for: tuple | None = None  # the controls and runners the whole queue was last explained for

    # -- what the plan asks --------------------------------------------------- #

    @property
    def active(self) -> bool:
        """Whether any control holds a job back (else the plan need not ask about each job)."""
        return self.paused or bool(self.paused_models) or bool(self.draining) or bool(self.removed)

    def allows(self, runner: Runner) -> bool:
        """Whether the runner may take a batch: not while the queue is paused, nor on a drained node."""
        return not self.paused and runner.node not in self.draining

    def held_models(self) -> frozenset[str]:
        """Models whose jobs may not start now."""
        return frozenset(self.paused_models)

    def why_waiting(self, job: Job, state: State, config: Config) -> str | None:
        """Why a control holds this queued job back, in the words its JobEvent and `atelier status` show."""
        if self.paused:
            return QUEUE_PAUSED
        model = job.spec.model
        if model in self.paused_models:
            return model_paused(model)
        if self.draining and model in config.models:
            entry = config.models[model]
            takers = [r for r in state.runners.values() if r.takes(entry)]
            if takers and all(r.node in self.draining for r in takers):
                return node_drained({r.node or "" for r in takers}, model)
        return None

    def explain(self, state: State, config: Config, fresh: list[Job], now: float, *, whole: bool = False) -> None:
        """Gives every queued job the reason a control holds it back (and takes it back once none does),
        announcing the jobs whose reason changed; fails the queued jobs of models a reload removed (one
        requeued after a runner died, say). ``fresh`` jobs are announced by the policy anyway.

        The whole queue is gone through when a control or the runners changed, and when ``whole`` (once a
        second); otherwise only the ``fresh`` jobs are: with a deep queue paused, each submit would else
        walk all of it."""
        if not self.active and not self.explained:
            return
        seen = (self.paused, frozenset(self.paused_models), frozenset(self.draining), frozenset(self.removed),
                state.joined, tuple(config.models))
        fresh_only = not whole and seen == self._explained_for
        if fresh_only:  # their places in line are the next whole walk's
            jobs: Iterable[Job] = [job for job in fresh if job.state is JobState.queued]
        else:
            self._explained_for = seen
            jobs = (state.jobs[entry.id] for entry in state.queue.order())
        quiet = {job.id for job in fresh}
        reasons: dict[str, str | None] = {}  # by model: the same for each of its jobs
        for place, job in enumerate(jobs):
            if self.paused and not fresh_only:  # nothing is planned while paused: the place in line is the queue's
                job.position = place
            model = job.spec.model
            if model in self.removed and model not in config.models:
                state.queue.remove(job.id)
                self.explained.pop(job.id, None)
                state.finish(job, JobState.failed, model_removed(model), now)
                continue
            if model not in reasons:
                reasons[model] = self.why_waiting(job, state, config)
            reason = reasons[model]
            given = self.explained.get(job.id)
            if reason is not None and reason != job.reason:
                job.reason = reason
                self.explained[job.id] = reason
            elif reason is None and given is not None:
                del self.explained[job.id]
                if job.reason == given:
                    job.reason = None
            else:
                continue
            if job.id not in quiet:
                state.effects.append(Announce(job))
        for job_id in [j for j in self.explained if j not in state.queue]:
            del self.explained[job_id]  # started, cancelled or ended: the reason went with it
        if self.removed:  # kept only while a job of such a model lives (a running one may come back)
            self.removed = {m for m in self.removed if any(j.live and j.spec.model == m for j in state.jobs.values())}

    # -- pause ---------------------------------------------------------------- #

    def pause(self, model: str | None, config: Config) -> bool:
        """Pauses the queue (``model`` None) or one model's jobs; False if it was paused already."""
        if model is None:
            changed, self.paused = not self.paused, True
            return changed
        if model not in config.models:
            raise Refused(ErrorCode.unknown_model, field="model",
                          message=f"no model {model!r} in the catalog (it has {', '.join(config.models)})")
        changed = model not in self.paused_models
        self.paused_models.add(model)
        return changed

    def resume(self, model: str | None) -> bool:
        """Resumes the queue (``model`` None: also every paused model) or one model; False if nothing was paused."""
        if model is None:
            changed = self.paused or bool(self.paused_models)
            self.paused = False
            self.paused_models.clear()
            return changed
        if model not in self.paused_models:
            return False
        self.paused_models.discard(model)
        return True

    # -- nodes ------------------------------------------------------------------ #

    def drain(self, node: str, state: State) -> bool:
        """Drains a node: its runners take nothing new. False if it was draining already."""
        if node in self.draining:
            return False
        if node not in nodes_known(state):
            known = ", ".join(sorted(nodes_known(state))) or "none has joined"
            raise Refused(ErrorCode.bad_request, field="node", message=f"no node {node!r} (nodes: {known})")
        self.draining.add(node)
        return True

    def undrain(self, node: str) -> bool:
        """The node serves again; False if it was not draining."""
        if node not in self.draining:
            return False
        self.draining.discard(node)
        self.drained.discard(node)
        return True

    def newly_drained(self, state: State) -> list[str]:
        """Draining nodes whose runners have all become idle since last asked: each is told once."""
        done = []
        for node in sorted(self.draining - self.drained):
            if not any(r.batch is not None for r in state.runners.values() if r.node == node):
                self.drained.add(node)
                done.append(node)
        return done

    def node_states(self, state: State) -> dict[str, NodeState]:
        """Every node the scheduler knows (runners, staged models) and every draining one, with its state."""
        found: dict[str, NodeState] = {node: "serving" for node in sorted(nodes_known(state))}
        for node in self.draining:
            busy = any(r.batch is not None for r in state.runners.values() if r.node == node)
            found[node] = "draining" if busy else "drained"
        return dict(sorted(found.items()))

    # -- order ------------------------------------------------------------------ #

    def to_front(self, job: Job, state: State, *, announce: bool = True) -> None:
        """The queued job starts next, after the jobs moved before it."""
        queued_only(job, "moved to the front")
        state.queue.remove(job.id)
        job.entry.priority = FRONT_CLASS + next(self._moves)
        state.queue.push(job.entry)
        self._explained_for = None  # the order changed: places in line are said again
        if announce:
            state.effects.append(Announce(job))

    def set_priority(self, job: Job, priority: Priority, state: State) -> None:
        """The queued job takes ``priority`` (and leaves the front lane, if it was there)."""
        queued_only(job, "given another priority")
        state.queue.remove(job.id)
        job.spec = job.spec.model_copy(update={"priority": priority})
        job.entry.priority = PRIORITY_CLASS[priority]
        state.queue.push(job.entry)
        self._explained_for = None
        state.effects.append(Announce(job))

    def front(self, state: State) -> list[str]:
        """The jobs of the front lane, in the order they start."""
        lane = [entry for entry in state.queue.order() if entry.priority < 0]
        return [entry.id for entry in lane]

    # -- the catalog ------------------------------------------------------------ #

    def reload(self, config: Config, models: Mapping[str, ModelEntry], default_model: str, state: State,
               now: float) -> CatalogChange:
        """Takes ``models`` as the catalog: ``config`` (the policy's own) changes in place."""
        old = {name: dump(entry) for name, entry in config.models.items()}
        new = {name: dump(entry) for name, entry in models.items()}
        added = sorted(set(new) - set(old))
        removed = sorted(set(old) - set(new))
        changed = sorted(name for name in set(old) & set(new) if old[name] != new[name])
        config.models = dict(models)
        config.default_model = default_model
        self.removed = (self.removed | set(removed)) - set(new)
        self.paused_models &= set(new)
        for model in changed + removed:
            for runner in state.runners.values():  # their copies go once idle: plan as if gone already
                runner.resident.pop(model, None)
                state.touch(runner)
            for node, staged in state.staged.items():
                staged.pop(model, None)
                state.restage(node)
        failed = []
        for entry in state.queue.order():
            job = state.jobs[entry.id]
            if job.spec.model in removed:
                state.queue.remove(job.id)
                self.explained.pop(job.id, None)
                state.finish(job, JobState.failed, model_removed(job.spec.model), now)
                failed.append(job)
        return CatalogChange(added, changed, removed, failed)

    # -- what a restart keeps ------------------------------------------------------ #

    def settings(self, state: State) -> dict[str, Any]:
        return {"paused": self.paused, "paused_models": sorted(self.paused_models),
                "draining": sorted(self.draining), "front": self.front(state)}

    def restore(self, settings: Mapping[str, Any], state: State, config: Config) -> None:
        """Takes back what ``settings`` kept (after the jobs were restored): a paused model no longer in the
        catalog is forgotten, a job of the front lane that is no longer queued too."""
        self.paused = bool(settings.get("paused", False))
        self.paused_models = {m for m in settings.get("paused_models", []) if m in config.models}
        self.draining = set(settings.get("draining", []))
        self.drained = set()
        for job_id in settings.get("front", []):
            job = state.jobs.get(job_id)
            if job is not None and job.state is JobState.queued and job.id in state.queue:
                self.to_front(job, state, announce=False)  # the next plan announces the restored jobs


def queued_only(job: Job, what: str) -> None:
    if job.state is not JobState.queued:
        raise Refused(ErrorCode.conflict, field="job_id",
                      message=f"job {job.id} is {job.state.value}: only a queued job can be {what}")


def nodes_known(state: State) -> set[str]:
    return {r.node for r in state.runners.values() if r.node} | set(state.staged)


def dump(entry: ModelEntry) -> dict[str, Any]:
    """A catalog entry as JSON data: what a reload compares, and what goes to runners and loaders."""
    return entry.model_dump(mode="json")
