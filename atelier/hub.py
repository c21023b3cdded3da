"""Catalog sources that are Hugging Face hub ids ("stabilityai/sdxl-turbo").

A hub id resolves to a snapshot folder in the Hugging Face cache (``$HF_HUB_CACHE``, by default
``~/.cache/huggingface/hub``), the same cache ``huggingface-cli download`` fills, so a model fetched
by hand beforehand is found on a host with no internet. Only a node with ``[node] downloads = true``
fetches what its cache lacks, and then only the files a diffusers folder loads safely: configs,
tokenizers and safetensors weights, never pickles.
"""

from __future__ import annotations

import re
from pathlib import Path

# owner/name, as the hub spells repository ids; a path that exists on this host is never taken for one.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")
# What a diffusers folder needs: model_index.json and each component's config, tokenizer files and
# safetensors weights. .bin, .ckpt and .pt weights are pickles and are never fetched.
FILES = ["*.json", "*.txt", "*.safetensors", "*.model", "*.tiktoken"]


class HubError(Exception):
    """A hub id that cannot be made a local folder, with what to do about it."""


def is_hub_id(source: str) -> bool:
    return _HUB_ID.fullmatch(source) is not None and ".." not in source and not Path(source).expanduser().exists()


def snapshot(repo_id: str, *, downloads: bool, revision: str | None = None) -> Path:
    """The local folder of ``repo_id``: from the cache, or fetched when ``downloads`` allows it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=FILES,
                                        local_files_only=not downloads))
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
