"""The Dockerfile subset templates are built from: parsing and ARG/ENV substitution.

Supported: FROM, RUN, COPY, ADD (local sources only, like COPY), ENV, WORKDIR, USER, ARG,
and two of ours: START (a command started, detached, when the template is finalised: the
service its sandboxes have running) and READY (a command polled until it exits 0 before
the checkpoint is taken). Line continuations (a trailing backslash), comments and the
JSON (exec) form of RUN/START/READY/COPY are Docker's. Anything else is refused with its
line number — a silently ignored instruction would build something else than asked.

The result is a list of resolved `Step`s: variables substituted, each with the canonical
text that goes into its cache key (see `manager/templates/cache.py`), so two Dockerfiles
that mean the same thing share layers.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field

from arcbox_vm.templates.models import BASE, OCI_PREFIX, check_template_name

SUPPORTED = ("FROM", "RUN", "COPY", "ADD", "ENV", "WORKDIR", "USER", "ARG", "START", "READY")
DISK_STEPS = ("RUN", "COPY", "ADD")  # steps that change the root disk (a layer each)
_HINTS = {"CMD": "use START (started when the template is finalised) instead",
          "ENTRYPOINT": "use START (started when the template is finalised) instead",
          "HEALTHCHECK": "use READY (polled until it succeeds before the checkpoint) instead"}
_VAR = re.compile(r"\\\$|\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<op>[-+])(?P<word>[^}]*))?\}"
                  r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")
_ARG_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class DockerfileError(ValueError):
    """The Dockerfile cannot be built; the message names the line."""


@dataclass(frozen=True)
class Step:
    """One resolved instruction.

    kind: the instruction. text: canonical, substituted — what the cache key and the
    progress show. argv (RUN, START, READY): the command. sources / dest / chown (COPY,
    ADD). env (ENV): the variables it sets. value (WORKDIR, USER, FROM). args: the ARG
    values in effect (RUN gets them in its environment; they are part of its key)."""

    kind: str
    line: int
    text: str
    argv: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    dest: str = ""
    chown: str = ""
    env: dict[str, str] = field(default_factory=dict)
    value: str = ""
    args: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Dockerfile:
    """A parsed Dockerfile: its base (FROM), the steps after it, START and READY."""

    base: str
    steps: tuple[Step, ...]
    start: Step | None = None
    ready: Step | None = None


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, instruction text) with continuations joined and comments dropped.
    A comment line inside a continuation is skipped (as Docker does)."""
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 0
    for no, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and buf):
            continue
        if not stripped:
            continue
        if not buf:
            start = no
        if raw.rstrip().endswith("\\"):
            buf.append(raw.rstrip()[:-1])
            continue
        buf.append(raw)
        out.append((start, " ".join(p.strip() for p in buf if p.strip())))
        buf = []
    if buf:
        out.append((start, " ".join(p.strip() for p in buf if p.strip())))
    return out


def substitute(text: str, variables: dict[str, str]) -> str:
    """`$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR:+alternative}`; `\\$` is a literal `$`.
    Unknown variables become empty (Docker's rule)."""
    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "\\$":
            return "$"
        name = m.group("braced") or m.group("plain")
        value = variables.get(name, "")
        if m.group("op") == "-":
            return value or substitute(m.group("word"), variables)
        if m.group("op") == "+":
            return substitute(m.group("word"), variables) if value else ""
        return value
    return _VAR.sub(repl, text)


def _json_list(rest: str) -> list[str] | None:
    """The exec (JSON) form, or None for the shell form."""
    if not rest.startswith("["):
        return None
    try:
        value = json.loads(rest)
    except ValueError:
        return None  # Docker treats a non-JSON "[..." as the shell form too
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        return None
    return value


def _command(rest: str, line: int, kind: str) -> tuple[str, ...]:
    if not rest:
        raise DockerfileError(f"line {line}: {kind} needs a command")
    argv = _json_list(rest)
    return tuple(argv) if argv is not None else ("/bin/sh", "-c", rest)


def _pairs(rest: str, line: int, variables: dict[str, str]) -> dict[str, str]:
    """ENV KEY=VALUE ... (quoted values allowed) or the old ENV KEY VALUE."""
    try:
        words = shlex.split(rest, posix=True)
    except ValueError as exc:
        raise DockerfileError(f"line {line}: ENV {rest!r}: {exc}") from None
    if not words:
        raise DockerfileError(f"line {line}: ENV needs KEY=VALUE")
    if "=" not in words[0]:
        key, _, value = rest.partition(" ")
        pairs = {key.strip(): substitute(value.strip(), variables)}
    else:
        pairs = {}
        for w in words:
            key, eq, value = w.partition("=")
            if not eq:
                raise DockerfileError(f"line {line}: ENV {w!r}: expected KEY=VALUE")
            pairs[key] = substitute(value, {**variables, **pairs})
    for key in pairs:
        if not _ARG_NAME.match(key):
            raise DockerfileError(f"line {line}: ENV {key!r} is not a variable name")
    return pairs


def _copy(kind: str, rest: str, line: int, variables: dict[str, str]) -> tuple[tuple[str, ...], str, str]:
    chown = ""
    words = rest.split()
    while words and words[0].startswith("--"):
        flag = words.pop(0)
        name, _, value = flag[2:].partition("=")
        if name == "chown" and value:
            chown = substitute(value, variables)
        elif name == "from":
            raise DockerfileError(f"line {line}: {kind} --from (multi-stage builds) is not supported")
        else:
            raise DockerfileError(f"line {line}: {kind} {flag}: unsupported flag (only --chown=USER[:GROUP])")
    rest = " ".join(words)
    items = _json_list(rest)
    if items is None:
        items = [substitute(w, variables) for w in rest.split()]
    else:
        items = [substitute(w, variables) for w in items]
    if len(items) < 2:
        raise DockerfileError(f"line {line}: {kind} needs at least one source and a destination")
    *sources, dest = items
    for s in sources:
        if "://" in s:
            raise DockerfileError(f"line {line}: {kind} {s}: URLs are not supported (the build has no network "
                                  "by default); put the file in the build context")
    return tuple(sources), dest, chown


def parse(text: str, build_args: dict[str, str] | None = None) -> Dockerfile:
    """Parse and resolve `text`; DockerfileError (a ValueError) names the offending line.
    `build_args` set ARG values (an ARG without a default and without a value is empty);
    a build arg that no ARG declares is an error (a typo would otherwise pass silently)."""
    given = dict(build_args or {})
    args: dict[str, str] = {}
    env: dict[str, str] = {}
    declared: set[str] = set()
    base = ""
    workdir = "/"
    steps: list[Step] = []
    start = ready = None
    for line, instr in logical_lines(text):
        word, _, rest = instr.partition(" ")
        kind, rest = word.upper(), rest.strip()
        if kind not in SUPPORTED:
            hint = _HINTS.get(kind, "supported: " + ", ".join(SUPPORTED))
            raise DockerfileError(f"line {line}: {kind} is not supported ({hint})")
        variables = {**args, **env}
        if kind == "ARG":
            name, eq, default = rest.partition("=")
            name = name.strip()
            if not _ARG_NAME.match(name) or " " in rest.partition("=")[0].strip():
                raise DockerfileError(f"line {line}: ARG {rest!r}: expected NAME or NAME=default")
            declared.add(name)
            args[name] = given[name] if name in given else substitute(default.strip().strip('"'), variables)
            if base:
                steps.append(Step("ARG", line, f"ARG {name}={args[name]}", value=name))
            continue
        if kind == "FROM":
            if base:
                raise DockerfileError(f"line {line}: a second FROM (multi-stage builds are not supported)")
            base = substitute(rest, variables).strip()
            if " " in base:
                raise DockerfileError(f"line {line}: FROM takes one image (no AS, no --platform)")
            check_base(base, line)
            continue
        if not base:
            raise DockerfileError(f"line {line}: {kind} before FROM (only ARG may come before FROM)")
        if (start is not None or ready is not None) and kind not in ("START", "READY"):
            raise DockerfileError(f"line {line}: {kind} after START/READY (they finish the Dockerfile)")
        if (kind == "START" and start is not None) or (kind == "READY" and ready is not None):
            raise DockerfileError(f"line {line}: a second {kind}")
        if kind in ("RUN", "START", "READY"):
            argv = _command(rest, line, kind)
            shown = json.dumps(list(argv)) if _json_list(rest) is not None else rest  # both unambiguous
            step = Step(kind, line, f"{kind} {shown}", argv=argv, args=dict(args))
            if kind == "RUN":
                steps.append(step)
            elif kind == "START":
                start = step
            else:
                ready = step
        elif kind in ("COPY", "ADD"):
            sources, dest, chown = _copy(kind, rest, line, variables)
            steps.append(Step("COPY", line, f"COPY{' --chown=' + chown if chown else ''} "
                              f"{json.dumps([*sources, dest])}", sources=sources, dest=dest, chown=chown))
        elif kind == "ENV":
            pairs = _pairs(rest, line, variables)
            env.update(pairs)
            steps.append(Step("ENV", line, "ENV " + json.dumps(pairs, sort_keys=True), env=pairs))
        elif kind in ("WORKDIR", "USER"):
            value = substitute(rest, variables).strip()
            if not value:
                raise DockerfileError(f"line {line}: {kind} needs a value")
            if kind == "WORKDIR":
                value = workdir = resolve_path(workdir, value)
            steps.append(Step(kind, line, f"{kind} {value}", value=value))
    if not base:
        raise DockerfileError("the Dockerfile has no FROM (e.g. FROM arcbox:base)")
    unknown = sorted(set(given) - declared)
    if unknown:
        raise DockerfileError(f"build args {', '.join(unknown)} are not declared by any ARG")
    return Dockerfile(base, tuple(steps), start, ready)


def check_base(base: str, line: int = 0) -> None:
    """FROM names `arcbox:base`, `oci-archive:PATH` or another template."""
    if base == BASE or base.startswith(OCI_PREFIX):
        return
    try:
        check_template_name(base)
    except ValueError:
        raise DockerfileError(f"line {line}: FROM {base!r}: name {BASE}, another template, or "
                              f"{OCI_PREFIX}PATH") from None


def resolve_path(workdir: str, path: str) -> str:
    """A guest path relative to the WORKDIR in effect (Docker's rule for WORKDIR and COPY)."""
    import posixpath

    if path.startswith("/"):
        return posixpath.normpath(path) if path != "/" else "/"
    return posixpath.normpath(posixpath.join(workdir or "/", path))
