"""A trainer's checkpoint as one safetensors file: tensors as tensors, everything else as JSON metadata.

No pickle (torch.save is one): a checkpoint crosses processes and lives in the artifact store.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load, save

_META = "atelier.training"  # the metadata key holding the JSON of everything that is not a tensor


def pack(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    # safetensors refuses tensors that share memory or are not contiguous: each is copied out alone.
    return save({k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()},
                metadata={_META: json.dumps(meta)})


def unpack(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = load(data)
    # safetensors.torch.load drops the metadata; the header is 8 bytes of length, then JSON.
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    metadata = header.get("__metadata__") or {}
    if _META not in metadata:
        raise ValueError("not an atelier training checkpoint (no training metadata in the safetensors header)")
    return tensors, json.loads(metadata[_META])


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """AdamW's state as flat tensors (``optim.<param index>.<key>``) and its param groups as JSON."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
