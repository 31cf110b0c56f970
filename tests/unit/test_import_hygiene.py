"""Import hygiene of the package: what the client loads, no import cycles, adapters only
behind the composition root, no module over 500 lines.

The static checks read every module under src/arcbox_vm with ast and count every import
statement: at module level, inside functions, under `if TYPE_CHECKING:`, in try blocks.
Importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py` first, so it counts as an
import of those packages too — except packages the importing module lives in, which
Python has imported before the module itself. (That is also why the root package's lazy
re-exports can never close a cycle: every module lives in it.)

Known violations in code that others are changing right now are listed with a reason and
run as xfail(strict=False) cases of their own; everything else is checked strictly.
Delete an entry once its change is merged.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

import arcbox_vm

PACKAGE_DIR = Path(arcbox_vm.__file__).resolve().parent  # the tree under test (yours, via PYTHONPATH)
SOURCE_ROOT = PACKAGE_DIR.parent
MAX_LINES = 500


# -- reading the sources --------------------------------------------------------------------


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool

    @property
    def package(self) -> str:
        """The package relative imports start from."""
        return self.name if self.is_package else self.name.rpartition(".")[0]


def _ancestors(name: str) -> Iterator[str]:
    parts = name.split(".")
    for i in range(1, len(parts)):
        yield ".".join(parts[:i])


class ImportGraph:
    """The modules of one package directory and who imports whom among them."""

    def __init__(self, package_dir: Path) -> None:
        self.modules: dict[str, Module] = {}
        for path in sorted(package_dir.rglob("*.py")):
            parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            self.modules[".".join(parts)] = Module(".".join(parts), path, is_package)
        self._imported: dict[str, frozenset[str]] = {}
        self._edges: dict[str, frozenset[str]] = {}

    def imported_names(self, name: str) -> frozenset[str]:
        """Every module name an import statement anywhere in the module names (resolved,
        relative imports included; `from p import x` names p.x too when x is a module)."""
        if name not in self._imported:
            module = self.modules[name]
            names: set[str] = set()
            for node in ast.walk(ast.parse(module.path.read_text(), str(module.path))):
                if isinstance(node, ast.Import):
                    names.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = module.package.split(".")
                        base = base[: len(base) - (node.level - 1)]
                        target = ".".join(base + ([node.module] if node.module else []))
                    else:
                        target = node.module or ""
                    names.add(target)
                    names.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in self.modules)
            self._imported[name] = frozenset(names)
        return self._imported[name]

    def edges(self, name: str) -> frozenset[str]:
        """The modules of ours that importing `name` makes Python import (see the docstring)."""
        if name not in self._edges:
            own = {*_ancestors(name), name}
            self._edges[name] = frozenset(
                candidate for target in self.imported_names(name) for candidate in (*_ancestors(target), target)
                if candidate in self.modules and candidate not in own)
        return self._edges[name]

    def cycles(self) -> list[list[str]]:
        """Strongly connected components of more than one module (Tarjan, iterative)."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        components: list[list[str]] = []

        def visit(node: str) -> tuple[str, Iterator[str]]:
            index[node] = low[node] = len(index)
            stack.append(node)
            on_stack.add(node)
            return node, iter(sorted(self.edges(node)))

        for start in self.modules:
            if start in index:
                continue
            work = [visit(start)]
            while work:
                node, children = work[-1]
                child = next(children, None)
                if child is None:
                    work.pop()
                    if work:
                        low[work[-1][0]] = min(low[work[-1][0]], low[node])
                    if low[node] == index[node]:
                        component: list[str] = []
                        while not component or component[-1] != node:
                            component.append(stack.pop())
                            on_stack.discard(component[-1])
                        if len(component) > 1:
                            components.append(sorted(component))
                elif child not in index:
                    work.append(visit(child))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
        return sorted(components)

    def cycle_path(self, component: list[str]) -> list[str]:
        """One shortest cycle through the component's first module, as a path."""
        members, start = set(component), component[0]
        parent: dict[str, str | None] = {start: None}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            for child in sorted(self.edges(node) & members):
                if child == start:
                    path = [node]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])  # type: ignore[arg-type]
                    return [*reversed(path), start]
                if child not in parent:
                    parent[child] = node
                    queue.append(child)
        return component


@cache
def graph() -> ImportGraph:
    return ImportGraph(PACKAGE_DIR)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _owner(names: list[str], known: dict[str, str]) -> str | None:
    """The known prefix every name is under, if any."""
    for prefix in known:
        if all(_under(n, prefix) for n in names):
            return prefix
    return None


def _cases(known: dict[str, str]) -> list:
    """One strict case for everything not listed, one xfail case per listed prefix."""
    return [pytest.param(None, id="everything-else"), *(
        pytest.param(prefix, id=prefix, marks=pytest.mark.xfail(reason=reason, strict=False))
        for prefix, reason in known.items())]


# -- what the client loads --------------------------------------------------------------------

CLIENT_MUST_NOT_LOAD = (
    "arcbox_vm.manager", "arcbox_vm.vmm", "arcbox_vm.agent.host", "arcbox_vm.composition", "arcbox_vm.network",
    "arcbox_vm.storage", "arcbox_vm.images", "httpx", "pyroute2",
)

_PROBE = """
import json, sys
import arcbox_vm, arcbox_vm.client
target = arcbox_vm.client.resolve_target()
print(json.dumps({"package": arcbox_vm.__file__, "target": str(target), "modules": sorted(sys.modules)}))
"""


def test_the_client_and_resolve_target_load_no_daemon_side_code(tmp_path):
    """A program that only talks to the daemon must not pay for (or need) the manager, the
    VMM drivers, networking, storage or the image builder — the config read included."""
    socket = tmp_path / "daemon.sock"
    config = tmp_path / "arcbox-vm.toml"
    config.write_text(f'[grpc]\nunix_socket = "{socket}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCBOX_VM_")}
    env["ARCBOX_VM_CONFIG"] = str(config)
    env["PYTHONPATH"] = os.pathsep.join([str(SOURCE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(seen["package"]).resolve() == PACKAGE_DIR / "__init__.py"  # the tree under test
    assert seen["target"] == f"unix:{socket}"  # the config file was read
    loaded = sorted(m for m in seen["modules"] if any(_under(m, p) for p in CLIENT_MUST_NOT_LOAD))
    assert not loaded, f"importing arcbox_vm.client + resolve_target() loaded {loaded}"


# -- import cycles -----------------------------------------------------------------------------

# Cycles in code others are untangling right now: {prefix: reason}. None at the moment.
KNOWN_CYCLES: dict[str, str] = {}


def test_the_import_graph_counts_every_kind_of_import(tmp_path):
    """The reader itself, on a made-up package: relative, function-level, TYPE_CHECKING and
    `from pkg import module` imports count, and so do the parents of what is imported;
    a module's own packages do not."""
    files = {
        "__init__.py": "from pkg import a\n",  # the root re-exports: never part of a cycle
        "a.py": "from . import b\nimport pkg.sub.deep as deep\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import X\n",
        "c.py": "def late():\n    from .sub import deep\n",
        "sub/__init__.py": "",
        "sub/deep.py": "from .. import c\nfrom pkg.sub import other\n",
        "sub/other.py": "",
    }
    for name, text in files.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    g = ImportGraph(tmp_path / "pkg")
    assert g.edges("pkg.a") == {"pkg.b", "pkg.sub", "pkg.sub.deep"}
    assert g.edges("pkg.b") == {"pkg.a"}  # under TYPE_CHECKING
    assert g.edges("pkg.c") == {"pkg.sub", "pkg.sub.deep"}  # inside a function
    assert g.edges("pkg.sub.deep") == {"pkg.c", "pkg.sub.other"}  # not its own package pkg.sub
    assert g.edges("pkg") == {"pkg.a"}
    assert g.cycles() == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.sub.deep"]]  # pkg.sub imports nothing
    assert g.cycle_path(["pkg.c", "pkg.sub.deep"]) == ["pkg.c", "pkg.sub.deep", "pkg.c"]
    # and the real one covers the whole package, generated stubs included
    assert {"arcbox_vm", "arcbox_vm.client.aio", "arcbox_vm.api.sandbox.v1.sandbox_pb2"} <= set(graph().modules)


@pytest.mark.parametrize("owner", _cases(KNOWN_CYCLES))
def test_no_import_cycles(owner):
    found = [c for c in graph().cycles() if _owner(c, KNOWN_CYCLES) == owner]
    assert not found, "import cycles:\n" + "\n".join(
        "  " + " -> ".join(graph().cycle_path(c)) + (f"   (all of: {', '.join(c)})" if len(c) > 2 else "") for c in found)


# -- adapters only behind the composition root -------------------------------------------------

ADAPTER_PACKAGES = ("arcbox_vm.vmm", "arcbox_vm.network", "arcbox_vm.storage", "arcbox_vm.images")
# Code that must reach adapters only through arcbox_vm.composition (which may import them).
ADAPTER_FREE = ("arcbox_vm.manager", "arcbox_vm.api", "arcbox_vm.cli", "arcbox_vm.client", "arcbox_vm.daemon",
                "arcbox_vm.models", "arcbox_vm.errors", "arcbox_vm.config", "arcbox_vm.ports", "arcbox_vm.metrics",
                "arcbox_vm.cluster")
# Modules allowed to import adapters anyway: {module: reason}. (arcbox_vm.cli.main only
# registers commands — it imports arcbox_vm.cli.* and typer — so it needs no entry.)
ADAPTER_EXCEPTIONS = {
    "arcbox_vm.cli.image": "the `image` command is the front end of the image builder (arcbox_vm.images); "
                           "it builds files, it does not run sandboxes",
}
# Violations in code others are changing right now: {prefix: reason}. None at the moment.
KNOWN_ADAPTER_IMPORTS: dict[str, str] = {}


def adapter_imports() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name in graph().modules:
        if not any(_under(name, p) for p in ADAPTER_FREE):
            continue
        hits = sorted(t for t in graph().imported_names(name) if any(_under(t, a) for a in ADAPTER_PACKAGES))
        if hits:
            found[name] = hits
    return found


@pytest.mark.parametrize("owner", _cases(KNOWN_ADAPTER_IMPORTS))
def test_only_the_composition_root_imports_adapters(owner):
    found = {m: t for m, t in adapter_imports().items()
             if m not in ADAPTER_EXCEPTIONS and _owner([m], KNOWN_ADAPTER_IMPORTS) == owner}
    assert not found, "adapter imports outside arcbox_vm.composition:\n" + "\n".join(
        f"  {m} imports {', '.join(t)}" for m, t in sorted(found.items()))


def test_adapter_exceptions_are_still_needed():
    """A listed exception that no longer imports an adapter is removed from the list."""
    assert set(ADAPTER_EXCEPTIONS) <= set(adapter_imports()), "stale entries in ADAPTER_EXCEPTIONS"


# -- module size -----------------------------------------------------------------------------------

# Modules being split by others right now: {prefix: reason}. A prefix also covers the
# package a module becomes.
BEING_SPLIT: dict[str, str] = {}

# Agreed exceptions, each with its own ceiling: {module: (max lines, why)}.
SIZE_EXCEPTIONS = {
    "arcbox_vm.agent.protocol": (570, "the wire protocol is ONE module shared by host and guest (a project rule); "
                                      "about 90 of its lines are the protocol's specification"),
}


def module_sizes() -> dict[str, int]:
    return {name: len(m.path.read_text().splitlines()) for name, m in graph().modules.items()
            if "_pb2" not in m.path.name}  # generated protobuf / gRPC stubs


@pytest.mark.parametrize("owner", _cases(BEING_SPLIT))
def test_no_module_has_more_than_500_lines(owner):
    big = {name: n for name, n in module_sizes().items()
           if n > SIZE_EXCEPTIONS.get(name, (MAX_LINES, ""))[0] and _owner([name], BEING_SPLIT) == owner}
    assert not big, f"modules over {MAX_LINES} lines: " + ", ".join(f"{m} ({n})" for m, n in sorted(big.items()))
