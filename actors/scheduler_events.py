"""The scheduler's part in cluster events: the queue going busy and idle, and the webhooks every event goes to.

``EventsHandlers`` is a mixin of ``Scheduler`` (actors/scheduler.py): after every round of effects
(``_carry_out``, the one place the policy's decisions go out) it compares what the queue holds with what
it last said, and publishes ``queue_busy`` or ``queue_idle`` through ``tell_cluster`` when that changed,
after the job events of that round: a program that hears "idle" finds every job's end already told.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from actors.messages import ClusterEvent, ClusterEventKind
from actors.webhooks import WebhookConfigError, Webhooks
from atelier.runtime import Failure
from atelier.scheduling.activity import QueueActivity, activity, busy

if TYPE_CHECKING:
    from atelier.config import Config
    from atelier.scheduling.policy import Policy

log = logging.getLogger("atelier.scheduler")

WEBHOOKS_CLOSE_S = 2.0  # at stop, queued webhook POSTs have this long to go out


class EventsHandlers:
    config: Config
    policy: Policy

    def _start_events(self) -> None:
        """Call once the journal is restored: the queue is as busy as what came back from it."""
        try:
            self.webhooks = Webhooks(self.config.events)
        except WebhookConfigError as exc:
            raise Failure(str(exc), 2) from None
        self.activity = QueueActivity(busy(self.policy.state))

    async def _note_activity(self) -> None:
        """Says queue_busy or queue_idle where the queue has just become so."""
        changed = self.activity.observe(busy(self.policy.state))
        if changed is None:
            return
        now = activity(self.policy.state)
        kind = ClusterEventKind.queue_busy if changed else ClusterEventKind.queue_idle
        log.info("queue %s (%d queued, %d running)", "busy" if changed else "idle", now.queued, now.running)
        await self.tell_cluster(kind, queued=now.queued, running=now.running)  # type: ignore[attr-defined]

    def _hand_to_webhooks(self, event: ClusterEvent) -> None:
        self.webhooks.send(event)

    async def on_stop(self) -> None:
        await self.webhooks.close(WEBHOOKS_CLOSE_S)
        await super().on_stop()  # type: ignore[misc]
