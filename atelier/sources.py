"""Where a catalog entry's weights are on this host.

Built-in tiny models are generated on first use; a folder is taken as it is.
Every other source fails with a reason a person can act on: nothing here
downloads behind anyone's back.
"""

from __future__ import annotations

from pathlib import Path

from atelier.config import ModelEntry
from atelier.tiny_models import BUILTIN, ensure_builtin

BUILTIN_PREFIX = "builtin:"


class ModelSourceError(Exception):
    """The catalog names weights that are not there (or not usable) on this host."""


def resolve(name: str, entry: ModelEntry, cache_dir: Path) -> Path | None:
    """The local folder holding ``name``'s weights, or None for a family that needs none."""
    if entry.family == "noop":
        return None
    source = entry.source
    if source.startswith(BUILTIN_PREFIX):
        builtin = source[len(BUILTIN_PREFIX):]
        if builtin not in BUILTIN:
            raise ModelSourceError(f"model {name}: no built-in model {builtin!r}; built-ins: {sorted(BUILTIN)}")
        return ensure_builtin(builtin, cache_dir)
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelSourceError(f"model {name}: {path} is not a diffusers folder (no model_index.json)")
        return path
    if path.exists():
        raise ModelSourceError(f"model {name}: single-file checkpoints ({path.name}) are not supported yet")
    raise ModelSourceError(f"model {name}: {source} does not exist on this host")
