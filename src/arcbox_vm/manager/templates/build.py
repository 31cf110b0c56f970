"""Building a template: plan the steps and their cache keys, run what the cache lacks in a
real sandbox, then boot the result, start its service, wait for READY and checkpoint it.

1. Plan (no VM): parse the Dockerfile, unpack the context into a private directory,
   resolve FROM into a base disk and key, and give every step its key — the parent's key,
   the resolved instruction, ARG values for RUN, the digest of what COPY copies — and the
   ENV / WORKDIR / USER in effect at it.
2. Cache: if a template of this name has the final key (the last step's key, START, READY,
   the defaults, the machine), the build is a hit and nothing runs. Otherwise the newest
   RUN/COPY step whose layer exists is where the build resumes.
3. Steps: one build sandbox boots from that layer and runs the remaining RUN/COPY steps,
   each kept as a layer (`runner.py`); it is removed after the last.
4. Finish: a fresh sandbox boots from the final layer with the Dockerfile's ENV, WORKDIR
   and USER as its defaults, runs START in the background, polls READY, and is
   checkpointed (a hidden checkpoint owned by the template); the row comes last.

Any failure raises TemplateBuildFailed (step, instruction, exit code, output) after the
build sandbox is removed; the template (an earlier build of it included) is untouched,
the layers of the steps that succeeded stay in the cache (`prune_templates` frees them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from arcbox_vm.errors import ArcboxError, InvalidArgument, TemplateBuildFailed
from arcbox_vm.image_config import OciImageConfig
from arcbox_vm.manager.context import ManagerContext
from arcbox_vm.manager.templates import layers, records
from arcbox_vm.manager.templates.runner import BuildSandbox, Progress, SandboxOps, StepFailed
from arcbox_vm.templates import buildctx, dockerfile
from arcbox_vm.templates.models import BASE, OCI_PREFIX, BuildProgress, TemplateBuildSpec, TemplateInfo


@dataclass
class Base:
    """Where a build starts: a disk, its key, and the defaults it brings (FROM a template)."""

    key: str
    disk: Path
    env: dict[str, str] = field(default_factory=dict)
    working_dir: str = ""
    user: str = ""


@dataclass
class Planned:
    no: int  # 1-based, FROM being step 1 (Docker's numbering)
    step: dockerfile.Step
    key: str
    parent: str
    env: dict[str, str]  # ENV in effect at this step
    working_dir: str
    user: str
    content: str = ""  # COPY: the digest of what it copies

    @property
    def makes_layer(self) -> bool:
        return self.step.kind in dockerfile.DISK_STEPS


async def resolve_base(ctx: ManagerContext, base: str, context_dir: Path | None, tmp: Path) -> Base:
    """FROM: the built Debian image, an OCI archive in the build context (imported once,
    then a cached layer keyed by the archive's sha256), or another template's root disk and
    defaults. An imported image's ENV, WORKDIR and USER are the starting ones."""
    if base == BASE:
        rootfs = ctx.config.defaults.rootfs
        disk = Path(rootfs) if rootfs else (await ctx.adapters.images.default_image()).rootfs
        st = disk.stat()
        return Base(layers.step_key("", f"FROM {BASE}", content=f"{disk.parent.name}/{disk.name}:{st.st_size}:"
                                                               f"{st.st_mtime_ns}"), disk)
    if base.startswith(OCI_PREFIX):
        return await oci_base(ctx, base[len(OCI_PREFIX):], context_dir, tmp)
    rec = records.load(ctx, base)
    disk = Path(rec.meta["disk_path"])
    if not disk.is_file():
        raise InvalidArgument(f"FROM {base}: its root disk is gone from the layer cache; rebuild template {base}")
    return Base(layers.step_key("", f"FROM template {base}", content=rec.key), disk, dict(rec.meta.get("env") or {}),
                rec.meta.get("working_dir", ""), rec.meta.get("user", ""))


async def oci_base(ctx: ManagerContext, name: str, context_dir: Path | None, tmp: Path) -> Base:
    """The archive is a file of the build context (API clients send it; the daemon never
    opens a path a client names)."""
    importer = ctx.adapters.import_oci
    if importer is None:
        raise InvalidArgument(f"FROM {OCI_PREFIX}: this manager cannot import OCI archives")
    archive = buildctx.context_file(context_dir, name) if context_dir is not None else None
    if archive is None:
        raise InvalidArgument(f"FROM {OCI_PREFIX}{name}: the archive must be a file in the build context "
                              "(and not excluded by .dockerignore)")
    digest = await asyncio.to_thread(buildctx.file_sha256, archive)
    key = layers.step_key("", f"FROM {OCI_PREFIX}", content=digest)
    cached = layers.find(ctx, key)
    if cached is not None:
        row = ctx.store.layer(key)
        assert row is not None
        config = OciImageConfig.from_json(json.loads(row["step"]).get("config") or {})
        return Base(key, cached, dict(config.env), config.working_dir, config.user)
    out = tmp / "oci.ext4"
    try:
        config = await asyncio.to_thread(importer, archive, out, None)
    except ArcboxError as exc:
        raise TemplateBuildFailed(1, f"FROM {OCI_PREFIX}{name}", str(exc)) from None
    step = json.dumps({"from": f"{OCI_PREFIX}{name}", "sha256": digest, "config": config.to_json()})
    disk = await layers.add(ctx, key, "", step, out)
    return Base(key, disk, dict(config.env), config.working_dir, config.user)


def plan(df: dockerfile.Dockerfile, base: Base, context_dir: Path | None, first_key: str) -> list[Planned]:
    """Every step with its key and the ENV/WORKDIR/USER in effect (no VM, no disk work)."""
    out: list[Planned] = []
    key, env, wd, user = first_key, dict(base.env), base.working_dir, base.user
    for i, step in enumerate(df.steps, start=2):
        content = ""
        if step.kind == "COPY":
            if context_dir is None:
                raise InvalidArgument(f"line {step.line}: COPY needs a build context")
            try:
                _, content, _ = buildctx.copy_archive(context_dir, step.sources, copy_dest(step, wd))
            except buildctx.ContextError as exc:
                raise InvalidArgument(f"line {step.line}: {exc}") from None
        parent = key
        key = layers.step_key(parent, step.text, step.args if step.kind == "RUN" else None, content)
        out.append(Planned(i, step, key, parent, dict(env), wd, user, content))
        if step.kind == "ENV":
            env.update(step.env)
        elif step.kind == "WORKDIR":
            wd = step.value
        elif step.kind == "USER":
            user = step.value
    return out


def copy_dest(step: dockerfile.Step, workdir: str) -> str:
    dest = dockerfile.resolve_path(workdir, step.dest)
    return dest + "/" if step.dest.endswith("/") and dest != "/" else dest


def final_state(steps: list[Planned], base: Base) -> tuple[dict[str, str], str, str]:
    env, wd, user = dict(base.env), base.working_dir, base.user
    for p in steps:
        env, wd, user = dict(p.env), p.working_dir, p.user
        if p.step.kind == "ENV":
            env.update(p.step.env)
        elif p.step.kind == "WORKDIR":
            wd = p.step.value
        elif p.step.kind == "USER":
            user = p.step.value
    return env, wd, user


class TemplateBuild:
    """One build (see the module docstring); `run()` returns the template's info."""

    def __init__(self, ctx: ManagerContext, ops: SandboxOps, spec: TemplateBuildSpec,
                 on_progress: Progress | None = None) -> None:
        self.ctx, self.ops, self.spec = ctx, ops, spec
        self._progress = on_progress
        self.ran: list[int] = []  # the steps that really ran (not from the cache)
        d = ctx.config.defaults
        self.memory_mib = spec.memory_mib or d.memory_mib
        self.vcpus = spec.vcpus or d.vcpus
        self.egress = spec.egress or "none"
        if self.egress == "nat" and ctx.config.templates.build_egress != "nat":
            raise InvalidArgument("builds may not reach the network here: the daemon's [templates] build_egress "
                                  "is \"none\"")

    def progress(self, event: BuildProgress) -> None:
        if self._progress is not None:
            self._progress(event)

    async def run(self) -> TemplateInfo:
        t0 = time.monotonic()
        try:
            df = dockerfile.parse(self.spec.dockerfile, self.spec.build_args)
        except dockerfile.DockerfileError as exc:
            raise InvalidArgument(f"Dockerfile: {exc}") from None
        tmp = layers.root(self.ctx) / "tmp" / secrets.token_hex(8)
        tmp.mkdir(parents=True, mode=0o700)
        layers.root(self.ctx).chmod(0o700)
        try:
            context_dir = self._context(tmp)
            return await self._build(df, context_dir, tmp, t0)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _context(self, tmp: Path) -> Path | None:
        ctx_in = self.spec.context
        if ctx_in is None:
            return None
        limit = self.ctx.config.templates.max_context_mib << 20
        try:
            data = buildctx.pack_context(ctx_in, limit) if isinstance(ctx_in, Path) else bytes(ctx_in)
            d = tmp / "context"
            d.mkdir(mode=0o700)
            buildctx.unpack_context(data, d, limit)
        except buildctx.ContextError as exc:
            raise InvalidArgument(str(exc)) from None
        return d

    async def _build(self, df: dockerfile.Dockerfile, context_dir: Path | None, tmp: Path, t0: float) -> TemplateInfo:
        spec, ctx = self.spec, self.ctx
        base = await resolve_base(ctx, df.base, context_dir, tmp)
        first_key, first_disk = base.key, base.disk
        size_layer = ""
        if spec.disk_size_mib:
            first_key = size_layer = layers.step_key(base.key, f"DISK {spec.disk_size_mib}")
        steps = plan(df, base, context_dir, first_key)
        env, wd, user = final_state(steps, base)
        last_key = steps[-1].key if steps else first_key
        machine = {"start": df.start.text if df.start else "", "ready": df.ready.text if df.ready else "",
                   "env": env, "working_dir": wd, "user": user, "memory_mib": self.memory_mib, "vcpus": self.vcpus,
                   "network_mode": spec.network}
        final_key = layers.step_key(last_key, "FINISH", content=json.dumps(machine, sort_keys=True))
        texts = [f"FROM {df.base}", *(p.step.text for p in steps)]
        total = len(texts) + (1 if df.start else 0) + (1 if df.ready else 0)
        existing = records.find(ctx, spec.name)
        if existing is not None and existing.key == final_key and not spec.no_cache:
            for no, text in enumerate(texts, 1):
                self.progress(BuildProgress("cached", no, total, text))
            self.progress(BuildProgress("done", total, total, spec.name, cached=True))
            return existing.info(ctx)

        disk, resume = first_disk, 0
        if not spec.no_cache:
            for i, p in enumerate(steps):
                if p.makes_layer and (found := layers.find(ctx, p.key)) is not None:
                    disk, resume = found, i + 1
        self.progress(BuildProgress("cached" if resume else "step", 1, total, texts[0]))
        if size_layer and not resume:
            disk = await self._sized_disk(size_layer, base, tmp)
        chain = [size_layer] if size_layer else []
        box = self._sandbox()
        try:
            for i, p in enumerate(steps):
                if i < resume:
                    self.progress(BuildProgress("cached", p.no, total, p.step.text))
                    if p.makes_layer:
                        layers.touch(ctx, p.key)
                        chain.append(p.key)
                    continue
                self.progress(BuildProgress("step", p.no, total, p.step.text))
                if not p.makes_layer:
                    continue
                self.ran.append(p.no)
                box.at(p.no, total)
                await self._guarded(p.no, p.step.text, self._disk_step(box, p, disk, context_dir))
                disk = layers.path_of(ctx, p.key)
                chain.append(p.key)
            await box.remove()
            info = await self._finish(df, box, disk, last_key, final_key, chain, env, wd, user, texts, total, t0)
        finally:
            await box.remove()
        self.progress(BuildProgress("done", total, total, spec.name))
        return info

    def _sandbox(self) -> BuildSandbox:
        return BuildSandbox(self.ctx, self.ops, self.spec.name, memory_mib=self.memory_mib, vcpus=self.vcpus,
                            network_mode=self.spec.network, egress=self.egress, progress=self.progress)

    async def _sized_disk(self, key: str, base: Base, tmp: Path) -> Path:
        found = layers.find(self.ctx, key)
        if found is not None and not self.spec.no_cache:
            return found
        grow = self.ctx.adapters.grow_disk
        if grow is None:
            raise InvalidArgument("this manager cannot grow disks (no disk grower adapter); leave disk_size_mib 0")
        work = tmp / "sized.ext4"
        await self.ctx.adapters.clone_disk(base.disk, work)
        try:
            await grow(work, self.spec.disk_size_mib)
        except ArcboxError as exc:
            raise TemplateBuildFailed(1, f"--disk-size {self.spec.disk_size_mib}M", str(exc)) from None
        return await layers.add(self.ctx, key, base.key, f"DISK {self.spec.disk_size_mib}", work)

    async def _guarded(self, no: int, text: str, work) -> None:  # noqa: ANN001 - a coroutine
        """Run one step's work; its failure becomes TemplateBuildFailed naming the step."""
        try:
            await work
        except StepFailed as exc:
            self.progress(BuildProgress("error", no, 0, str(exc), exit_code=exc.exit_code))
            raise TemplateBuildFailed(no, text, str(exc), exc.exit_code, exc.output) from None
        except ArcboxError as exc:
            if isinstance(exc, (TemplateBuildFailed, InvalidArgument)):
                raise
            self.progress(BuildProgress("error", no, 0, str(exc)))
            raise TemplateBuildFailed(no, text, str(exc)) from None

    async def _disk_step(self, box: BuildSandbox, p: Planned, disk: Path, context_dir: Path | None) -> None:
        if not box.id:
            await box.boot(disk)
        if p.step.kind == "RUN":
            env = {**p.step.args, **p.env}  # ENV wins over ARG (Docker's rule)
            await box.run(p.step.argv, env=env, working_dir=p.working_dir or "/", user=p.user)
        else:
            assert context_dir is not None
            archive, _, tops = buildctx.copy_archive(context_dir, p.step.sources, copy_dest(p.step, p.working_dir))
            await box.copy(archive, tops, p.step.chown)
        await box.save_layer(p.key, p.parent, p.step.text)

    async def _finish(self, df: dockerfile.Dockerfile, box: BuildSandbox, disk: Path, last_key: str, final_key: str,
                      chain: list[str], env: dict[str, str], wd: str, user: str, texts: list[str], total: int,
                      t0: float) -> TemplateInfo:
        """Boot the final disk afresh with the defaults, START, READY, checkpoint, record."""
        ctx, spec = self.ctx, self.spec
        no = len(texts) + 1
        start_id = ""
        if df.start is not None:
            self.progress(BuildProgress("step", no, total, df.start.text))
        box.at(no, total)
        await self._guarded(no, df.start.text if df.start else "boot", box.boot(disk, env, wd, user))
        if wd not in ("", "/"):
            await self._guarded(no, f"WORKDIR {wd}", box.run(("mkdir", "-p", "--", wd), env={}, working_dir="/",
                                                             user="root", echo=False))
        if df.start is not None:
            start_id = await self._start(box, df.start, env, wd, user, no)
            self.ran.append(no)
            no += 1
        if df.ready is not None:
            self.progress(BuildProgress("step", no, total, df.ready.text))
            await self._guarded(no, df.ready.text, box.wait_ready(
                df.ready.argv, env=env, working_dir=wd, user=user, timeout=spec.ready_timeout_s,
                start_exec=start_id))
            self.ran.append(no)
        ck = await box.checkpoint(f"template {spec.name}", records.owner_of(spec.name))
        meta = {"base": df.base, "steps": [*texts, *(s.text for s in (df.start, df.ready) if s is not None)],
                "layers": chain, "disk_key": last_key, "disk_path": str(disk), "env": env, "working_dir": wd,
                "user": user, "start": df.start.text if df.start else "", "ready": df.ready.text if df.ready else "",
                "memory_mib": self.memory_mib, "vcpus": self.vcpus, "network_mode": spec.network,
                "build_seconds": round(time.monotonic() - t0, 2), "checkpoint_bytes": ck.size_bytes}
        rec = records.TemplateRecord(spec.name, final_key, ck.id, time.time(), meta)
        try:
            records.replace(ctx, rec)
        except BaseException:
            with contextlib.suppress(ArcboxError):
                from arcbox_vm.manager import checkpoints as ckpts

                ckpts.delete(ctx, ck.id, hidden_ok=True)
            raise
        return rec.info(ctx)

    async def _start(self, box: BuildSandbox, start: dockerfile.Step, env: dict[str, str], wd: str, user: str,
                     no: int) -> str:
        started: list[str] = []

        async def go() -> None:
            started.append(await box.start(start.argv, env=env, working_dir=wd, user=user))

        await self._guarded(no, start.text, go())
        return started[0]

