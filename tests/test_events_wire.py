"""Who may say what on ``cluster/<event>``: the broker takes a cluster event from the scheduler alone, and
only on its own kind's topic, so no runner or frontend can tell other programs the GPU is free."""

from __future__ import annotations

import asyncio

import pytest

from actors.actor import Actor, RemoteError
from actors.messages import ClusterEvent, ClusterEventKind, Role
from broker import Broker
from tests.conftest import broker_thread

pytestmark = pytest.mark.timeout(60)


def test_only_the_scheduler_publishes_cluster_events_on_their_own_topics() -> None:
    idle = ClusterEvent(event=ClusterEventKind.queue_idle, at=0.0, detail={"queued": 0, "running": 0})

    async def go(broker: Broker) -> dict[str, str]:
        outcomes = {}
        cases = [("scheduler", Role.scheduler, "cluster/queue_idle"),
                 ("runner", Role.runner, "cluster/queue_idle"),
                 ("frontend", Role.frontend, "cluster/queue_idle"),
                 ("unknown-kind", Role.scheduler, "cluster/gpu_free"),
                 ("as-a-job", Role.scheduler, "job/j1/cluster")]
        for name, role, topic in cases:
            peer = type("Peer", (Actor,), {"role": role})(name, broker.router_endpoint, heartbeat_s=5.0)
            await peer.start()
            try:
                await peer.ask("#" + topic, idle, timeout=1.0)
                outcomes[name] = "answered"
            except RemoteError as exc:
                outcomes[name] = exc.error.message
            except asyncio.TimeoutError:
                outcomes[name] = "published"  # no reply: it went out on the events socket
            finally:
                await peer.close(drain_timeout=0)
        return outcomes

    with broker_thread(heartbeat_s=5.0) as (broker, _):
        outcomes = asyncio.run(go(broker))
    assert outcomes["scheduler"] == "published"
    assert outcomes["runner"] == "a runner may not publish 'cluster_event' on 'cluster/queue_idle'"
    assert outcomes["frontend"] == "a frontend may not publish 'cluster_event' on 'cluster/queue_idle'"
    assert outcomes["unknown-kind"] == "a scheduler may not publish 'cluster_event' on 'cluster/gpu_free'"
    assert outcomes["as-a-job"] == "a scheduler may not publish 'cluster_event' on 'job/j1/cluster'"
