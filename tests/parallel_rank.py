"""One rank of a test gang (tests/test_parallel.py), run as ``python -m tests.parallel_rank SPEC``.

SPEC is JSON: {"rank", "world", "port", "family", "path", "out", "layout" (ParallelLayout fields, or
null for a plain single process), "requests": [[width, height], ...], "steps", "device"}. The rank
joins a gloo process group ONCE, loads the model with the family's own load, applies
``atelier.families.parallel.parallelize`` and runs every request in a row, writing each output as
<out>/rank<r>-<i>.npy (float32, HxWx3 per image, stacked) and its last step's latents as
<out>/rank<r>-<i>-latents.npy, and to <out>/rank<r>.json the seconds each
took, the steps its callback saw, and the requests refused with a ValueError (index, message).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(spec: dict) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from atelier.config import ParallelLayout
    from atelier.families import GenerateRequest, get_family
    from atelier.families.loaded import LoadRequest

    rank, world, out = spec["rank"], spec["world"], Path(spec["out"])
    device = spec.get("device", "cpu")
    layout = ParallelLayout(**spec["layout"]) if spec["layout"] else None
    groups = 0
    if layout is not None:
        import torch.distributed as dist

        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{spec['port']}", rank=rank,
                                world_size=world)
        groups = 1
    family = get_family(spec["family"])
    tokens: list[int] = []  # the image+text tokens the first block sees per call: a split shows there

    def load() -> object:
        model = family.load(LoadRequest(Path(spec["path"]), device=device, dtype_name="float32"))
        if layout is not None:
            from atelier.families.parallel import parallelize

            model = parallelize(model, layout, rank=rank, world=world, device=device)
        block = model.pipe.transformer.transformer_blocks[0]
        block.register_forward_pre_hook(lambda _, args, kwargs: tokens.append(kwargs["hidden_states"].shape[1]),
                                        with_kwargs=True)
        return model

    model = load()
    times = []
    steps_seen = []
    refused: list[list] = []
    for index, (width, height) in enumerate(spec["requests"]):
        request = GenerateRequest.single(prompt="a red cube on a table", negative_prompt=None, width=width,
                                         height=height, steps=spec.get("steps", 2), guidance=3.5, seed=11 + index)
        seen: list[int] = []
        last: list = []

        def on_step(step: int, total: int, latents: object, seen: list = seen, last: list = last) -> None:
            seen.append(step)
            last[:] = [latents.detach().float().numpy().copy()]

        start = time.perf_counter()
        try:
            images = model.generate(request, on_step)
        except ValueError as exc:  # a size the gang refuses: recorded, and the gang goes on
            refused.append([index, str(exc)])
            continue
        times.append(time.perf_counter() - start)
        steps_seen.append(seen)
        np.save(out / f"rank{rank}-{index}.npy", np.stack([np.asarray(im, dtype=np.float32) for im in images]))
        np.save(out / f"rank{rank}-{index}-latents.npy", last[0])  # the last step's, before the VAE
    report = {"times": times, "groups_formed": groups, "steps": steps_seen, "refused": refused}
    if spec.get("switch"):
        # Another model in the same gang (a fresh load of the same folder): parallelised anew, on the
        # same process group and the same device mesh (no new subgroups), its first request again.
        import torch.distributed as dist

        from atelier.families import parallel

        groups_before = len(dist.distributed_c10d._world.pg_map) if layout is not None else 0
        del model
        model = load()
        width, height = spec["requests"][0]
        request = GenerateRequest.single(prompt="a red cube on a table", negative_prompt=None, width=width,
                                         height=height, steps=spec.get("steps", 2), guidance=3.5, seed=11)
        images = model.generate(request, lambda *_: None)
        np.save(out / f"rank{rank}-switch.npy", np.stack([np.asarray(im, dtype=np.float32) for im in images]))
        report["new_groups_on_switch"] = (len(dist.distributed_c10d._world.pg_map) - groups_before
                                          if layout is not None else 0)
        report["meshes"] = len(parallel._MESHES)
    report["tokens"] = tokens
    if layout is not None:
        import torch.distributed as dist

        # Still the one group formed above.
        assert dist.is_initialized() and dist.get_world_size() == world
        dist.destroy_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
