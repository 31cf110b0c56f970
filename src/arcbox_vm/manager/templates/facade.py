"""The template methods of the `SandboxManager` facade (a mixin): validate, call the use case."""

from __future__ import annotations

from arcbox_vm.errors import ArcboxError, InvalidArgument
from arcbox_vm.manager.context import ManagerContext
from arcbox_vm.manager.templates import layers, records
from arcbox_vm.manager.templates.build import TemplateBuild
from arcbox_vm.manager.templates.runner import Progress
from arcbox_vm.templates.models import TemplateBuildSpec, TemplateInfo, check_template_name


class TemplateOperations:
    """Mixed into `SandboxManager` (which provides `_ctx` and `_ensure_started`)."""

    _ctx: ManagerContext
    _building: set[str] | None = None

    async def _ensure_started(self) -> None:  # pragma: no cover - provided by SandboxManager
        raise NotImplementedError

    async def build_template(self, spec: TemplateBuildSpec, on_progress: Progress | None = None) -> TemplateInfo:
        """Build (or rebuild) template `spec.name` from a Dockerfile; returns it once it is
        recorded. Steps whose inputs did not change come from the layer cache; an unchanged
        Dockerfile and context is a cache hit (no VM boots). `on_progress` is called with
        each `BuildProgress` (steps, cached steps, command output). A failure raises
        TemplateBuildFailed (step, exit code, output) and leaves the template as it was;
        the build sandbox is always removed. One build per name at a time."""
        if not isinstance(spec, TemplateBuildSpec):
            raise InvalidArgument("build_template takes a TemplateBuildSpec")
        await self._ensure_started()
        if self._building is None:
            self._building = set()
        if spec.name in self._building:
            raise ArcboxError(f"template {spec.name!r} is being built right now; wait for that build to end")
        self._building.add(spec.name)
        try:
            return await TemplateBuild(self._ctx, self, spec, on_progress).run()  # type: ignore[arg-type]
        finally:
            self._building.discard(spec.name)
            self._template_changed(spec.name)  # its warm pool, if any, replaces members of an old build

    def list_templates(self) -> list[TemplateInfo]:
        """Every template, oldest first."""
        self._ctx.open_events()
        return records.listing(self._ctx)

    def inspect_template(self, name: str) -> TemplateInfo:
        """One template (TemplateNotFound if there is none of that name)."""
        self._ctx.open_events()
        return records.load(self._ctx, _name(name)).info(self._ctx)

    def remove_template(self, name: str) -> int:
        """Remove a template: it is no longer listed and no new sandbox can be made from it.
        Sandboxes made from it run on (they hold the files they use, freed when the last
        of them is removed); returns how many there are. Its layers stay cached
        (`prune_templates` removes them)."""
        self._ctx.open_events()
        if self._building and name in self._building:
            raise ArcboxError(f"template {name!r} is being built right now; remove it after that build")
        users = records.remove(self._ctx, _name(name))
        self._template_changed(name)  # its warm pool, if any, is drained
        return users

    def _template_changed(self, name: str) -> None:
        pools = getattr(self, "_pools", None)
        if pools is not None:
            pools.template_changed(name)

    def prune_templates(self) -> tuple[int, int]:
        """Remove cached layers no template is built from; returns (layers, bytes freed)."""
        self._ctx.open_events()
        if self._building:
            raise ArcboxError("a template build is running; prune after it ends")
        return layers.prune(self._ctx, records.layers_in_use(self._ctx))

    def template_layers(self) -> list[dict[str, object]]:
        """The layer cache (key, parent, step, size, times), oldest first: for `inspect`."""
        self._ctx.open_events()
        return [{k: v for k, v in row.items() if k != "path"} for row in self._ctx.store.layers()]


def _name(name: str) -> str:
    try:
        return check_template_name(name)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None

