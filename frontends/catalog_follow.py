"""A frontend's view of the catalog, kept as the scheduler serves it across an operator's reload.

The scheduler publishes ``catalog_reloaded`` (a ``ClusterEvent``) after a reload; a frontend that
hears it asks for the catalog (``GetCatalog``) and takes it into its own config, so that what it
checks and lists (the A1111 and ComfyUI model lists, the default model) is the new catalog
without a restart. Events are lossy: a frontend that missed one still submits correctly (the
scheduler decides), and lists the old catalog until the next reload or restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from actors.actor import RemoteError
from actors.catalog import take
from actors.codec import SCHEDULER
from actors.messages import ClusterEventKind, GetCatalog
from atelier.config import Config
from frontends.client import AtelierClient

log = logging.getLogger("atelier.catalog")


async def follow_catalog(client: AtelierClient, config: Config | None,
                         changed: Callable[[Config | None], None] | None = None) -> None:
    """Runs until cancelled: after each reload, ``config``'s models and default model become the
    scheduler's (where a config is given), and ``changed`` is called."""
    async for event in client.cluster_events():
        if event.event is not ClusterEventKind.catalog_reloaded:
            continue
        try:
            catalog = await client.ask(SCHEDULER, GetCatalog())
        except (RemoteError, asyncio.TimeoutError) as exc:
            log.warning("the catalog was reloaded, but could not be read: %s", exc)
            continue
        if config is not None:
            take(config, catalog)
        log.info("catalog reloaded: %d models, default %s", len(catalog.models), catalog.default_model)
        if changed is not None:
            changed(config)
