"""One rank of a test gang (tests/test_parallel.py), run as ``python -m tests.parallel_rank SPEC``.

SPEC is JSON: {"rank", "world", "port", "out", "device", "steps", "layout" (ParallelLayout fields, or
null for a plain single process), "models": [{"family", "path", "requests": [[width, height], ...]}, ...]}.
The rank joins a gloo process group ONCE, then for each model in turn (a model switch inside the gang)
loads it with the family's own load, applies ``atelier.families.parallel.parallelize`` and runs its
requests in a row. Request j of model i is written as <out>/rank<r>-<i>-<j>.npy (float32, HxWx3 per
image, stacked) and its last step's latents as <out>/rank<r>-<i>-<j>-latents.npy; <out>/rank<r>.json
holds the seconds each call took, the steps its callback saw, the requests refused with a ValueError
(model, request, message), the image tokens the first block's attention saw per call, and the process
groups and device meshes made after the first model's.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def serve(model: object, i: int, requests: list, steps: int, out: Path, name: str, report: dict) -> None:
    """Runs ``requests`` (model ``i``'s) in a row on ``model``, writing <out>/<name>-<i>-<j>[-latents].npy and
    adding to ``report`` what main's JSON says."""
    import numpy as np

    from atelier.families import GenerateRequest

    # The first block's attention (SD3's split is a hook on the block itself, after its pre-hooks).
    hook = model.pipe.transformer.transformer_blocks[0].attn.register_forward_pre_hook(
        lambda _, args, kwargs: report["tokens"].append([i, kwargs["hidden_states"].shape[1]]), with_kwargs=True)
    try:
        for j, (width, height) in enumerate(requests):
            request = GenerateRequest.single(prompt="a red cube on a table", negative_prompt=None, width=width,
                                             height=height, steps=steps, guidance=3.5, seed=11 + j)
            seen: list[int] = []
            last: list = []

            def on_step(step: int, total: int, latents: object, seen: list = seen, last: list = last) -> None:
                seen.append(step)
                last[:] = [latents.detach().float().cpu().numpy().copy()]

            start = time.perf_counter()
            try:
                images = model.generate(request, on_step)
            except ValueError as exc:  # a size the gang refuses: recorded, and the gang goes on
                report["refused"].append([i, j, str(exc)])
                continue
            report["times"].append(time.perf_counter() - start)
            report["steps"].append(seen)
            np.save(out / f"{name}-{i}-{j}.npy", np.stack([np.asarray(im, dtype=np.float32) for im in images]))
            np.save(out / f"{name}-{i}-{j}-latents.npy", last[0])  # the last step's, before the VAE
    finally:
        hook.remove()


def main(spec: dict) -> None:
    import torch

    torch.set_num_threads(1)
    from atelier.config import ParallelLayout
    from atelier.families import get_family
    from atelier.families.loaded import LoadRequest

    rank, world, out = spec["rank"], spec["world"], Path(spec["out"])
    device = spec.get("device", "cpu")
    layout = ParallelLayout(**spec["layout"]) if spec["layout"] else None
    dist = None
    if layout is not None:
        import torch.distributed as dist

        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                init_method=f"tcp://127.0.0.1:{spec['port']}", rank=rank, world_size=world)
    report: dict = {"times": [], "steps": [], "refused": [], "tokens": []}
    groups_after_first = None
    for i, entry in enumerate(spec["models"]):
        model = get_family(entry["family"]).load(LoadRequest(Path(entry["path"]), device=device,
                                                             dtype_name="float32"))
        if layout is not None:
            from atelier.families.parallel import parallelize

            model = parallelize(model, layout, rank=rank, world=world, device=device)
        serve(model, i, entry["requests"], spec.get("steps", 2), out, f"rank{rank}", report)
        del model
        if dist is not None and i == 0:
            groups_after_first = len(dist.distributed_c10d._world.pg_map)
    if dist is not None:
        from atelier.families import parallel

        # Models after the first made no process groups: the same mesh served them.
        report["new_groups_after_first"] = len(dist.distributed_c10d._world.pg_map) - groups_after_first
        report["meshes"] = len(parallel._MESHES)
        assert dist.is_initialized() and dist.get_world_size() == world  # still the one group
        dist.destroy_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
