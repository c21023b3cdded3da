"""Where a catalog entry's weights are on this host.

Built-in tiny models are generated on first use; a folder is taken as it is; a
single ``.safetensors`` checkpoint in the original (LDM) layout is taken with the
folder of configs its entry names; a hub id is a snapshot in the Hugging Face cache
(see ``atelier.hub``). Every other source fails with a reason a
person can act on: nothing here downloads behind anyone's back.
"""

from __future__ import annotations

from pathlib import Path

from atelier import hub, staging
from atelier.config import ModelEntry
from atelier.registry import FAMILIES
from atelier.tiny_models import BUILTIN, ensure_builtin

BUILTIN_PREFIX = "builtin:"
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin"})

# A family's single-file parts (their key prefixes), for the families that load from one file.
_LDM_PARTS = {name: dict(spec.single_file_parts) for name, spec in FAMILIES.items() if spec.single_file_parts}


class ModelSourceError(Exception):
    """The catalog names weights that are not there (or not usable) on this host."""


def resolve(name: str, entry: ModelEntry, cache_dir: Path, *, downloads: bool = False) -> Path | None:
    """The local folder or single file holding ``name``'s weights, or None for a family that needs none.
    ``downloads``: a hub id missing from the Hugging Face cache may be fetched (the node's setting)."""
    if entry.family == "noop":
        return None
    path = _locate(name, entry, cache_dir, downloads)
    if path.is_file():
        _check_single_file(name, entry, path)
    elif entry.config is not None:
        raise ModelSourceError(f"model {name}: `config` is only for a single-file source; "
                               f"the diffusers folder {path} has its own configs")
    else:
        _check_no_pickles(name, path)
    if entry.revision is not None and not hub.is_hub_id(entry.source):
        raise ModelSourceError(f"model {name}: `revision` picks a hub repository's commit; {entry.source} "
                               "is not a hub id")
    if entry.variant is not None:
        _check_variant(name, entry.variant, path)
    if entry.transformer is not None:
        _check_transformer(name, entry, path, cache_dir)
    return path


def transformer_file(entry: ModelEntry, cache_dir: Path) -> Path | None:
    """Where the entry's GGUF ``transformer`` is (``resolve`` checks it, and writes a built-in one); None
    for an entry without one."""
    if entry.transformer is None:
        return None
    if entry.transformer.startswith(BUILTIN_PREFIX):
        return Path(cache_dir) / entry.transformer[len(BUILTIN_PREFIX):]
    return Path(entry.transformer).expanduser()


def _check_transformer(name: str, entry: ModelEntry, path: Path, cache_dir: Path) -> None:
    """Refuses a GGUF transformer that is not there, or not GGUF, naming the field; builds a built-in one."""
    from atelier.families import gguf
    from atelier.tiny.gguf import BUILTIN_GGUF, ensure_builtin_gguf

    if not path.is_dir():
        raise ModelSourceError(f"model {name}: `transformer` goes with a diffusers folder as `source` (its other "
                               f"components and the transformer's config); {path.name} is a single file")
    if entry.transformer.startswith(BUILTIN_PREFIX):
        builtin = entry.transformer[len(BUILTIN_PREFIX):]
        if builtin not in BUILTIN_GGUF:
            raise ModelSourceError(f"model {name}: transformer: no built-in GGUF file {builtin!r}; "
                                   f"built-ins: {sorted(BUILTIN_GGUF)}")
        ensure_builtin_gguf(builtin, cache_dir)
    problem = gguf.check_file(transformer_file(entry, cache_dir))
    if problem is not None:
        raise ModelSourceError(f"model {name}: transformer: {problem}")
    if not (path / "transformer" / "config.json").is_file():
        raise ModelSourceError(f"model {name}: transformer: {path} has no transformer/config.json, the config "
                               "the GGUF transformer is built with")


def config_folder(entry: ModelEntry) -> Path | None:
    """The folder of configs a single-file entry is built with; None for any other source."""
    return Path(entry.config).expanduser() if entry.config is not None else None


def _locate(name: str, entry: ModelEntry, cache_dir: Path, downloads: bool) -> Path:
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
    if path.is_file():
        return path
    if hub.is_hub_id(source):
        try:
            return hub.snapshot(source, downloads=downloads, revision=entry.revision, variant=entry.variant)
        except hub.HubError as exc:
            raise ModelSourceError(f"model {name}: {exc}") from None
    raise ModelSourceError(f"model {name}: {source} does not exist on this host")


def _check_single_file(name: str, entry: ModelEntry, path: Path) -> None:
    """Refuses, with the reason, a single file that cannot be built into ``entry``'s pipeline."""
    if path.suffix in PICKLE_SUFFIXES:
        raise ModelSourceError(f"model {name}: {path.name} is a pickle checkpoint, and atelier never loads "
                               "pickle (unpickling can run any code); convert it to .safetensors")
    if path.suffix != ".safetensors":
        raise ModelSourceError(f"model {name}: {path.name} is neither a diffusers folder nor a .safetensors file")
    if entry.family not in _LDM_PARTS:
        raise ModelSourceError(f"model {name}: family {entry.family!r} loads only from a diffusers folder")
    configs = config_folder(entry)
    if configs is None:
        # diffusers would fetch these from the hub; this host does not download.
        raise ModelSourceError(
            f"model {name}: {path.name} is a single-file checkpoint, which does not carry the configs, "
            f'tokenizer and scheduler its pipeline is built with: add config = "/path/to/folder" to '
            f"[models.{name}], a diffusers folder of the same architecture (model_index.json and each "
            "component's config and tokenizer files; its weights are not needed)")
    if not (configs / "model_index.json").is_file():
        raise ModelSourceError(f"model {name}: config {configs} is not a diffusers folder (no model_index.json)")
    keys = _safetensors_keys(name, path)
    missing = [part for part, prefixes in _LDM_PARTS[entry.family].items() if not _has(keys, prefixes)]
    if missing:
        others = [f for f, parts in _LDM_PARTS.items()
                  if f != entry.family and all(_has(keys, p) for p in parts.values())]
        hint = f"; it looks like a {others[0]} checkpoint (family = {others[0]!r})" if others else ""
        raise ModelSourceError(f"model {name}: {path.name} is not a {entry.family} checkpoint in the original "
                               f"(LDM) layout: it has no weights for the {', '.join(missing)}{hint}")


def _check_no_pickles(name: str, path: Path) -> None:
    """Refuses a diffusers folder with a component whose weights are only pickles (.bin, .ckpt, ...):
    from_pretrained would unpickle them, and unpickling can run any code."""
    for sub in sorted(path / component for component in staging.model_components(path)):
        files = [f for f in sub.iterdir() if f.is_file()] if sub.is_dir() else []
        if any(f.suffix in PICKLE_SUFFIXES for f in files) and not any(f.suffix == ".safetensors" for f in files):
            raise ModelSourceError(f"model {name}: {sub.name} has only pickle weights ({sub.name}/*.bin), and "
                                   "atelier never loads pickle (unpickling can run any code); convert them to "
                                   ".safetensors")


def _check_variant(name: str, variant: str, path: Path) -> None:
    """Refuses a variant the folder has no files of, as from_pretrained would, but naming the model."""
    if path.is_file():
        raise ModelSourceError(f"model {name}: `variant` picks among a diffusers folder's weight files; "
                               f"{path.name} is a single file")
    if not staging.variant_components(path, variant):
        raise ModelSourceError(f"model {name}: {path} has no weight files of the variant {variant!r} (such as "
                               f"unet/diffusion_pytorch_model.{variant}.safetensors); remove `variant` or fix it")


def _has(keys: list[str], prefixes: tuple[str, ...]) -> bool:
    return any(k.startswith(prefixes) for k in keys)


def _safetensors_keys(name: str, path: Path) -> list[str]:
    """The tensor names in a safetensors file's header (the header alone is read, and checked)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            length = staging.header_length(f.read(8), size)
            tensors = staging.parse_header(f.read(length), size - 8 - length)
    except staging.StagingError as exc:
        raise ModelSourceError(f"model {name}: {path.name} is not a readable safetensors file "
                               f"(damaged, cut short, or something else under that name: {exc})") from None
    return list(tensors)
