"""Catalog sources that are Hugging Face hub ids ("stabilityai/sdxl-turbo").

A hub id resolves to a snapshot folder in the Hugging Face cache (``$HF_HUB_CACHE``, by default
``~/.cache/huggingface/hub``), the same cache ``huggingface-cli download`` fills, so a model fetched
by hand beforehand is found on a host with no internet. Only a node with ``[node] downloads = true``
fetches what its cache lacks, and then only the files a diffusers folder loads safely: configs,
tokenizers and the safetensors weights of the entry's ``variant``, never pickles.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
from pathlib import Path

# owner/name, as the hub spells repository ids; a path that exists on this host is never taken for one.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")
# What a diffusers folder needs: model_index.json and each component's config, tokenizer files and
# safetensors weights. .bin, .ckpt and .pt weights are pickles and are never fetched.
FILES = ["*.json", "*.txt", "*.safetensors", "*.model", "*.tiktoken"]
# A weight file's name as diffusers writes it: name[.variant][-00001-of-00003].safetensors.
_WEIGHTS = re.compile(r"[^.]+(?:\.(?P<variant>[\w]+))?(?:-\d+-of-\d+)?\.safetensors")


class HubError(Exception):
    """A hub id that cannot be made a local folder, with what to do about it."""


def is_hub_id(source: str) -> bool:
    return _HUB_ID.fullmatch(source) is not None and ".." not in source and not Path(source).expanduser().exists()


def wanted(files: list[str], variant: str | None) -> list[str]:
    """Of a repository's files, those a diffusers folder of ``variant`` loads: every config and
    tokenizer file, and in each folder the safetensors weights of that variant, or its plain ones where
    it has none of that variant (diffusers falls back to them the same way). A repository ships fp16,
    fp32 and EMA weights side by side; the others would double or triple the download."""
    chosen = [f for f in files if not f.endswith(".safetensors") and _safe(f)]
    by_folder: dict[str, dict[str | None, list[str]]] = {}
    for file in files:
        match = _WEIGHTS.fullmatch(posixpath.basename(file))
        # Weights at the top are the single-file checkpoint some repositories carry beside the folder:
        # the same model again, which a diffusers load never reads.
        if match and posixpath.dirname(file):
            by_folder.setdefault(posixpath.dirname(file), {}).setdefault(match["variant"], []).append(file)
    for weights in by_folder.values():
        chosen += weights.get(variant) or (weights.get(None, []) if variant else [])
    return sorted(chosen)


def _safe(file: str) -> bool:
    return any(fnmatch.fnmatch(posixpath.basename(file), pattern) for pattern in FILES)


def snapshot(repo_id: str, *, downloads: bool, revision: str | None = None, variant: str | None = None) -> Path:
    """The local folder of ``repo_id``: from the cache, or fetched when ``downloads`` allows it (only
    the files ``wanted`` names for ``variant``)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        files, cache_only = FILES, not downloads
        if downloads:
            # What to fetch is worked out from the repository's listing; the cache alone is read as it is.
            try:
                files = wanted(HfApi().list_repo_files(repo_id, revision=revision), variant)
            except (GatedRepoError, RevisionNotFoundError, RepositoryNotFoundError):
                raise
            except Exception:  # the hub cannot be reached (offline, DNS, timeout): the cache is all there is
                cache_only = True
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=files,
                                        local_files_only=cache_only))
    except LocalEntryNotFoundError:
        if downloads:
            raise HubError(f"{repo_id} is not in this host's Hugging Face cache and the hub cannot be reached") \
                from None
        raise HubError(f"{repo_id} is not in this host's Hugging Face cache, and this node does not download: "
                       f"fetch it first (huggingface-cli download {repo_id}), or set downloads = true in "
                       "[node]") from None
    except GatedRepoError:
        raise HubError(f"{repo_id} is gated: accept its licence on the hub and log in "
                       "(huggingface-cli login) on this host") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise HubError(f"no repository {repo_id} on the hub (or it is private: log in first)") from None
    if not (folder / "model_index.json").is_file():
        raise HubError(f"{repo_id} is not a diffusers pipeline (no model_index.json in it)")
    return folder
