"""A runner's or loader's side of a catalog reload: the scheduler's ``CatalogUpdate`` taken into its config.

The scheduler read the file and validated it whole; each entry is validated again here (the message
crossed a process boundary). What changed or left the catalog is returned: the caller's copies of
those models (resident in VRAM, staged in shared memory) are of the old entry, and go once nothing uses them.
"""

from __future__ import annotations

import logging

from pydantic import ValidationError

from actors.messages import Catalog, CatalogUpdate
from atelier.config import Config, ModelEntry

log = logging.getLogger("atelier.catalog")


def take(config: Config, update: CatalogUpdate | Catalog) -> list[str]:
    """Replaces ``config``'s models and default model with the update's; returns the models whose copies
    made from the old catalog are stale (changed or removed). An entry this process cannot read is left
    out, with a log line: its jobs fail here with "unknown model" rather than run on an old entry."""
    fresh: dict[str, ModelEntry] = {}
    for name, data in update.models.items():
        try:
            fresh[name] = ModelEntry.model_validate_json(data)
        except ValidationError as exc:
            log.error("catalog update: model %s cannot be read here (%s); it is left out", name,
                      exc.errors(include_url=False)[0]["msg"])
    old = {name: entry.model_dump(mode="json") for name, entry in config.models.items()}
    stale = sorted(name for name, dumped in old.items()
                   if name not in fresh or fresh[name].model_dump(mode="json") != dumped)
    config.models = fresh
    config.default_model = update.default_model
    if stale:
        log.info("catalog update: %s changed or removed", ", ".join(stale))
    return stale
