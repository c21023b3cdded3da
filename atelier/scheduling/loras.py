"""The LoRAs users trained: who owns each, who may use it, and how a job's name for one resolves.

A job names a trained LoRA as its owner does, ``my-style``, or as anyone it is shared with does,
``@owner/my-style``. Admission resolves either to the LoRA's reference, ``@<version>``, before the job
is queued: a version is unique, so a LoRA trained again under the same name is a different adapter to
the runners (which cache adapters by reference), and two users' ``my-style`` never batch together.
A name of the model's catalog entry stays as it is.
"""

from __future__ import annotations

from atelier.jobs import ErrorCode, JobSpec, LoraInfo
from atelier.scheduling.admission import Refused


def split_name(name: str) -> tuple[str, str] | None:
    """(owner, name) of ``@owner/name``, as a job names a LoRA shared with its user; None otherwise."""
    if not name.startswith("@") or "/" not in name:
        return None
    owner, _, own = name[1:].rpartition("/")
    return (owner, own) if owner and own else None


class LoraBook:
    """Every trained LoRA, by (owner, name). The scheduler fills it from the journal and keeps both in step."""

    def __init__(self, loras: list[LoraInfo] = ()):
        self._loras: dict[tuple[str, str], LoraInfo] = {(lora.owner, lora.name): lora for lora in loras}
        self._refs = {lora.ref: lora for lora in loras}

    def get(self, owner: str, name: str) -> LoraInfo | None:
        return self._loras.get((owner, name))

    def by_ref(self, ref: str) -> LoraInfo | None:
        """The LoRA a resolved reference names, while it is that version (not deleted, not trained again)."""
        return self._refs.get(ref)

    def put(self, lora: LoraInfo) -> None:
        """Adds a LoRA, or replaces its owner's of that name (and its version: jobs resolved to the old one fail)."""
        self.remove(lora.owner, lora.name)
        self._loras[(lora.owner, lora.name)] = lora
        self._refs[lora.ref] = lora

    def remove(self, owner: str, name: str) -> LoraInfo | None:
        lora = self._loras.pop((owner, name), None)
        if lora is not None:
            self._refs.pop(lora.ref, None)
        return lora

    def usable_by(self, user: str, model: str | None = None) -> list[LoraInfo]:
        """The user's own LoRAs and those shared with them (of ``model`` only, if given), by name."""
        mine = [lora for lora in self._loras.values()
                if (lora.owner == user or user in lora.shared_with) and (model is None or lora.model == model)]
        return sorted(mine, key=lambda lora: (lora.owner != user, lora.owner, lora.name))

    def resolve(self, spec: JobSpec, catalog: dict[str, str]) -> JobSpec:
        """The job with each trained LoRA it names as its reference; raises Refused naming the one that it
        may not use (unknown, someone else's and not shared, or trained on another model). ``catalog``:
        the model's own LoRAs, which keep their names."""
        if not spec.loras:
            return spec
        resolved: dict[str, float] = {}
        for name, scale in spec.loras.items():
            if name in catalog:
                resolved[name] = scale
                continue
            if name in self._refs:  # resolved already (a job read back from the journal)
                lora = self._refs[name]
                if lora.owner == spec.user or spec.user in lora.shared_with:
                    resolved[name] = scale
                    continue
            owner, own_name = split_name(name) or (spec.user, name)
            lora = self._loras.get((owner, own_name))
            if lora is None or (lora.owner != spec.user and spec.user not in lora.shared_with):
                # The same answer whether it exists or not: another user's unshared LoRA is not disclosed.
                offered = ", ".join(sorted(catalog) + [lo.name if lo.owner == spec.user else f"@{lo.owner}/{lo.name}"
                                                       for lo in self.usable_by(spec.user, spec.model)]) or "none"
                raise Refused(ErrorCode.bad_request, f"loras: {spec.model} has no LoRA {name!r} (it has: {offered})",
                              field="loras")
            if lora.model != spec.model:
                raise Refused(ErrorCode.bad_request, f"loras: {name!r} was trained on {lora.model}, not "
                                                     f"{spec.model}; choose model {lora.model}", field="loras")
            resolved[lora.ref] = scale
        return spec.model_copy(update={"loras": dict(sorted(resolved.items()))})
