"""The scheduler's handlers for an operator's controls: pause, drain, reorder, reload the catalog.

A mixin of ``Scheduler`` (``actors/scheduler.py``): the rules are the policy's
(``atelier/scheduling/controls.py``); here they meet the wire. Every control is answered with the
controls as they stand (or the job it moved), published as a ``ClusterEvent``, and kept in the
journal's settings, so a restarted scheduler is still paused, still draining, its front lane still
in order.

A catalog reload reads the file the scheduler was started with (``config_path``), takes its
``models`` and ``default_model`` (nothing else: the rest of a config takes a restart), and sends
the new catalog to every runner and loader (``CatalogUpdate``), and to each that joins later:
the message is the truth, whatever file a node reads. Frontends hear ``catalog_reloaded`` and ask
for the catalog (``GetCatalog``).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from actors.actor import handles
from actors.codec import Envelope
from actors.loader import loader_name
from actors.messages import (
    Catalog,
    CatalogChanges,
    CatalogUpdate,
    ClusterEventKind,
    DrainNode,
    Error,
    GetCatalog,
    GetControls,
    JobInfo,
    MoveToFront,
    OperatorControls,
    PauseQueue,
    PeerUp,
    ReloadCatalog,
    ResumeNode,
    ResumeQueue,
    Role,
    SetPriority,
)
from atelier.jobs import ErrorCode
from atelier.runtime import Failure, read_config
from atelier.scheduling.admission import Refused

if TYPE_CHECKING:
    from actors.scheduler import Scheduler

log = logging.getLogger("atelier.scheduler")

SETTINGS = "operator_controls"  # the journal's settings row


class OperatorHandlers:
    """``Scheduler``'s operator handlers (the Actor collects ``@handles`` over the MRO)."""

    # The config file it was started with (serve sets it): what a reload reads. None: the built-in settings.
    config_path: str | Path | None = None
    _catalog_reloaded = False  # since it started: a runner or loader that joins is sent the catalog

    # -- state ------------------------------------------------------------------ #

    def _restore_controls(self: Scheduler) -> None:
        """After the jobs: what an operator set before the restart holds again."""
        kept = self.journal.setting(SETTINGS)
        if isinstance(kept, dict):
            self.policy.controls.restore(kept, self.policy.state, self.config)
            controls = self.policy.controls
            if controls.paused or controls.paused_models or controls.draining:
                log.warning("operator controls kept from before the restart: %s", self._controls_now())

    def _keep_controls(self: Scheduler) -> None:
        try:
            self.journal.put_setting(SETTINGS, self.policy.controls.settings(self.policy.state))
        except sqlite3.Error:  # the control holds; only a restart now would forget it
            log.exception("journal: cannot keep the operator's controls")

    def _controls_now(self: Scheduler) -> OperatorControls:
        controls = self.policy.controls
        return OperatorControls(paused=controls.paused, paused_models=sorted(controls.paused_models),
                                nodes=controls.node_states(self.policy.state))

    async def _tell_drained(self: Scheduler) -> None:
        """``node_drained`` for each draining node whose runners have just all become idle."""
        for node in self.policy.controls.newly_drained(self.policy.state):
            log.info("node %s is drained: its runners are idle", node)
            await self.tell_cluster(ClusterEventKind.node_drained, node=node)

    async def _operator_peer_up(self: Scheduler, msg: PeerUp) -> None:
        """A runner or loader joining after a reload may hold the catalog of a file it read before it."""
        if self._catalog_reloaded and msg.role in (Role.runner, Role.loader):
            await self.send(msg.name, self._catalog_update())

    def _catalog_update(self: Scheduler) -> CatalogUpdate:
        return CatalogUpdate(models={name: entry.model_dump_json() for name, entry in self.config.models.items()},
                             default_model=self.config.default_model)

    # -- the queue -------------------------------------------------------------- #

    @handles(GetControls)
    async def on_get_controls(self: Scheduler, msg: GetControls, env: Envelope) -> OperatorControls:
        return self._controls_now()

    @handles(PauseQueue)
    async def on_pause(self: Scheduler, msg: PauseQueue, env: Envelope) -> OperatorControls | Error:
        try:
            changed = self.policy.controls.pause(msg.model, self.config)
        except Refused as refused:
            return _error(refused)
        if changed:
            log.info("operator: paused %s", f"model {msg.model}" if msg.model else "the queue")
            self._keep_controls()
            await self._schedule()  # the queued jobs say why they wait
            await self.tell_cluster(ClusterEventKind.paused, model=msg.model)
        return self._controls_now()

    @handles(ResumeQueue)
    async def on_resume(self: Scheduler, msg: ResumeQueue, env: Envelope) -> OperatorControls:
        if self.policy.controls.resume(msg.model):
            log.info("operator: resumed %s", f"model {msg.model}" if msg.model else "the queue")
            self._keep_controls()
            await self._schedule()
            await self.tell_cluster(ClusterEventKind.resumed, model=msg.model)
        return self._controls_now()

    # -- nodes ------------------------------------------------------------------ #

    @handles(DrainNode)
    async def on_drain_node(self: Scheduler, msg: DrainNode, env: Envelope) -> OperatorControls | Error:
        try:
            changed = self.policy.controls.drain(msg.node, self.policy.state)
        except Refused as refused:
            return _error(refused)
        if changed:
            log.info("operator: draining node %s", msg.node)
            self._keep_controls()
            await self.tell_cluster(ClusterEventKind.node_draining, node=msg.node)
            await self._schedule()  # also says node_drained at once where its runners are idle
        return self._controls_now()

    @handles(ResumeNode)
    async def on_resume_node(self: Scheduler, msg: ResumeNode, env: Envelope) -> OperatorControls | Error:
        if not self.policy.controls.undrain(msg.node):
            return Error(code=ErrorCode.conflict, field="node",
                         message=f"node {msg.node[:128]!r} is not draining; nothing to resume")
        log.info("operator: node %s serves again", msg.node)
        self._keep_controls()
        await self.tell_cluster(ClusterEventKind.node_resumed, node=msg.node)
        await self._schedule()
        return self._controls_now()

    # -- jobs ------------------------------------------------------------------- #

    @handles(MoveToFront)
    async def on_move_to_front(self: Scheduler, msg: MoveToFront, env: Envelope) -> JobInfo | Error:
        try:
            job = self.policy.job(msg.job_id)
            self.policy.controls.to_front(job, self.policy.state)
        except Refused as refused:
            return _error(refused)
        log.info("operator: job %s moved to the front", job.id)
        self._keep_controls()
        await self._schedule()
        return JobInfo(job=job.record(self.clock()))

    @handles(SetPriority)
    async def on_set_priority(self: Scheduler, msg: SetPriority, env: Envelope) -> JobInfo | Error:
        try:
            job = self.policy.job(msg.job_id)
            self.policy.controls.set_priority(job, msg.priority, self.policy.state)
        except Refused as refused:
            return _error(refused)
        log.info("operator: job %s is now of priority %s", job.id, msg.priority.value)
        self._keep_controls()  # it may have left the front lane
        await self._schedule()
        return JobInfo(job=job.record(self.clock()))

    # -- the catalog ------------------------------------------------------------ #

    @handles(GetCatalog)
    async def on_get_catalog(self: Scheduler, msg: GetCatalog, env: Envelope) -> Catalog:
        update = self._catalog_update()
        return Catalog(models=update.models, default_model=update.default_model)

    @handles(ReloadCatalog)
    async def on_reload_catalog(self: Scheduler, msg: ReloadCatalog, env: Envelope) -> CatalogChanges | Error:
        if self.config_path is None:
            return Error(code=ErrorCode.bad_request, message=(
                "the scheduler runs on the built-in settings (no config file) and has no catalog file to read; "
                "start it with --config atelier.toml to reload one"))
        try:
            fresh = await asyncio.to_thread(read_config, str(self.config_path))
        except Failure as failure:  # names the file and the first problem; nothing changes
            log.warning("operator: catalog reload refused: %s", failure)
            return Error(code=ErrorCode.bad_request, message=f"{failure}; nothing was changed")
        change = self.policy.controls.reload(self.config, fresh.models, fresh.default_model, self.policy.state,
                                             self.clock())
        self._catalog_reloaded = True
        log.info("operator: catalog reloaded from %s: added %s, changed %s, removed %s", self.config_path,
                 change.added or "none", change.changed or "none", change.removed or "none")
        update = self._catalog_update()
        for name in [*(r for r in self.policy.state.runners), *(loader_name(node) for node in self.loaders)]:
            await self.send(name, update)
        self._keep_controls()  # a paused model that was removed is no longer paused
        await self._schedule()  # delivers the failed jobs; the added models' jobs may start
        await self.tell_cluster(ClusterEventKind.catalog_reloaded, added=",".join(change.added),
                                changed=",".join(change.changed), removed=",".join(change.removed))
        return CatalogChanges(added=change.added, changed=change.changed, removed=change.removed)


def _error(refused: Refused) -> Error:
    return Error(code=refused.code, message=refused.message, field=refused.field,
                 retry_after_s=refused.retry_after_s)
