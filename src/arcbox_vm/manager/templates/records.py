"""Templates as the manager keeps them: a row, a hidden checkpoint it owns, its layers.

A template is a checkpoint (hidden from `snapshot ls`, owned: `meta.owner` =
"template:<name>", never deleted at start like the hidden checkpoints of forks) of a
sandbox booted from the built root disk after START ran and READY passed. The row is
written last (after the checkpoint), so a crash leaves no template half-made; start-up
deletes owned checkpoints no template row names and build sandboxes a crash left.

Removal deletes the row and the checkpoint at once, even while sandboxes made from the
template run: each holds hard links to the checkpoint files its VMM uses and has its
own disk copy (the checkpoints' keep-until-free rule), so they run on and the space is
freed when the last of them is removed. `in_use` counts them.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from arcbox_vm.errors import ArcboxError, TemplateNotFound
from arcbox_vm.manager import checkpoints as ckpts
from arcbox_vm.manager.context import ManagerContext
from arcbox_vm.manager.templates import layers
from arcbox_vm.templates.models import TemplateInfo

log = logging.getLogger(__name__)

BUILD_LABEL = "arcbox.template-build"  # on build sandboxes (listed while a build runs)
TEMPLATE_LABEL = "arcbox.template"  # on sandboxes made from a template


def owner_of(name: str) -> str:
    return f"template:{name}"


@dataclass
class TemplateRecord:
    name: str
    key: str
    checkpoint_id: str
    created_at: float
    meta: dict[str, Any]

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "TemplateRecord":
        return cls(row["name"], row["key"], row["checkpoint_id"], row["created_at"], json.loads(row["meta"]))

    def to_row(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "checkpoint_id": self.checkpoint_id,
                "created_at": self.created_at, "meta": json.dumps(self.meta)}

    @property
    def network_mode(self) -> str:
        return str(self.meta.get("network_mode", "tap"))

    def info(self, ctx: ManagerContext) -> TemplateInfo:
        m = self.meta
        size = m.get("checkpoint_bytes", 0)
        return TemplateInfo(
            name=self.name, key=self.key, created_at=self.created_at, base=m.get("base", ""), size_bytes=size,
            memory_mib=m.get("memory_mib", 0), vcpus=m.get("vcpus", 0), env=dict(m.get("env") or {}),
            working_dir=m.get("working_dir", ""), user=m.get("user", ""), start=m.get("start", ""),
            ready=m.get("ready", ""), steps=tuple(m.get("steps") or ()), build_seconds=m.get("build_seconds", 0.0),
            in_use=ckpts.in_use(ctx, self.checkpoint_id))


def find(ctx: ManagerContext, name: str) -> TemplateRecord | None:
    for row in ctx.store.templates():
        if row["name"] == name:
            return TemplateRecord.from_row(row)
    return None


def load(ctx: ManagerContext, name: str) -> TemplateRecord:
    rec = find(ctx, name)
    if rec is None:
        raise TemplateNotFound(name)
    return rec


def listing(ctx: ManagerContext) -> list[TemplateInfo]:
    return [TemplateRecord.from_row(r).info(ctx) for r in ctx.store.templates()]


def remove(ctx: ManagerContext, name: str) -> int:
    """Forget the template and delete its checkpoint; returns how many sandboxes made from
    it still run (they keep the files they use until they are removed)."""
    rec = load(ctx, name)
    users = ckpts.in_use(ctx, rec.checkpoint_id)
    ctx.store.delete_template(name)
    with contextlib.suppress(ArcboxError):
        ckpts.delete(ctx, rec.checkpoint_id, hidden_ok=True)
    return users


def replace(ctx: ManagerContext, rec: TemplateRecord) -> None:
    """Record `rec` (its checkpoint exists), replacing a template of that name: the old
    one's checkpoint is deleted after the new row is in."""
    old = find(ctx, rec.name)
    ctx.store.put_template(rec.to_row())
    if old is not None and old.checkpoint_id != rec.checkpoint_id:
        with contextlib.suppress(ArcboxError):
            ckpts.delete(ctx, old.checkpoint_id, hidden_ok=True)


def layers_in_use(ctx: ManagerContext) -> set[str]:
    """The layers every template was built from (kept by prune: a rebuild reuses them)."""
    return {k for r in ctx.store.templates() for k in json.loads(r["meta"]).get("layers") or ()}


def reconcile(ctx: ManagerContext) -> None:
    """At start: owned checkpoints no template names (a crash between the checkpoint and the
    row, or during a rebuild), template rows whose checkpoint is gone, stray layer files."""
    rows = ctx.store.templates()
    checkpoints = {r["id"]: r for r in ctx.store.checkpoints()}
    named = set()
    for row in rows:
        if row["checkpoint_id"] not in checkpoints:
            log.warning("template %s lost its checkpoint; forgetting it (rebuild it)", row["name"])
            ctx.store.delete_template(row["name"])
        named.add(row["checkpoint_id"])
    for cid, row in checkpoints.items():
        owner = json.loads(row["meta"]).get("owner", "")
        if owner.startswith("template:") and cid not in named:
            with contextlib.suppress(ArcboxError):
                ckpts.delete(ctx, cid, hidden_ok=True)
    layers.reconcile(ctx)
    tmp = layers.root(ctx) / "tmp"
    if tmp.is_dir():
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
