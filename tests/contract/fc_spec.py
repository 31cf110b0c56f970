"""Firecracker's OpenAPI (Swagger 2.0) spec as JSON-Schema validators.

`FirecrackerSpec(path)` loads one spec file, converts its `definitions` to JSON Schema
(draft 4, which Swagger 2.0 schemas are based on), resolving `#/definitions/...` refs, and
marks every object schema that lists `properties` as `additionalProperties: false` unless it
says otherwise: Firecracker's request structs use serde `deny_unknown_fields`, so an unknown
key is a 400 from the real server even though the spec does not say so.

`spec.route(method, path)` maps a concrete request path (`/drives/rootfs`) to the spec's
template (`/drives/{drive_id}`), its path parameters and the body schema; `spec.validate()`
returns the list of problems (empty = valid).
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SPEC_DIR = Path(__file__).resolve().parent / "firecracker_spec"
SPEC_FILES = {"HEAD": SPEC_DIR / "firecracker.yaml", "v1.16.1": SPEC_DIR / "firecracker-v1.16.1.yaml"}

# Swagger-only keywords that are not JSON Schema validation keywords (or must not be applied).
_DROP = {"readOnly", "example", "discriminator", "xml", "externalDocs", "format"}


class _Yaml12Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """YAML 1.2 booleans: PyYAML follows YAML 1.1, where the spec's `Off` (a log level) would
    load as False; Firecracker's spec means the string, so only true/false are booleans."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_LOADER = _Yaml12Loader


class UnknownRoute(KeyError):
    pass


@dataclass(frozen=True)
class Route:
    template: str
    method: str
    params: dict[str, str]
    schema: dict[str, Any] | None  # JSON schema of the body, None if the operation takes none
    body_required: bool


def _convert(node: Any) -> Any:
    """Swagger schema -> JSON Schema (draft 4), closing objects that list their properties."""
    if isinstance(node, list):
        return [_convert(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or key.startswith("x-"):
            continue
        if key == "properties" and isinstance(value, dict):
            out[key] = {name: _convert(sub) for name, sub in value.items()}
        elif key in ("items", "not", "additionalProperties") and isinstance(value, dict):
            out[key] = _convert(value)
        elif key in ("allOf", "anyOf", "oneOf") and isinstance(value, list):
            out[key] = [_convert(v) for v in value]
        elif key == "default":
            out[key] = value
        else:
            out[key] = _convert(value) if isinstance(value, (dict, list)) else value
    if "$ref" in out:  # draft 4: siblings of $ref are ignored anyway; keep only the ref
        return {"$ref": out["$ref"]}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


class FirecrackerSpec:
    def __init__(self, path: Path, name: str | None = None) -> None:
        self.path = Path(path)
        raw = yaml.load(self.path.read_text(), Loader=_LOADER)
        self.raw = raw
        self.name = name or self.path.name
        self.version = str(raw["info"]["version"])
        self.definitions: dict[str, Any] = {k: _convert(v) for k, v in raw["definitions"].items()}
        self._routes: list[tuple[re.Pattern[str], str, dict[str, Any]]] = []
        for template, ops in raw["paths"].items():
            regex = "^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "$"
            self._routes.append((re.compile(regex), template, ops))
        self._validators: dict[str, jsonschema.Validator] = {}

    # ------------------------------------------------------------------ schema access

    def schema_for(self, definition: str) -> dict[str, Any]:
        """A self-contained JSON schema for one definition (refs resolve into `definitions`)."""
        return {"$ref": f"#/definitions/{definition}", "definitions": self.definitions}

    def _validator(self, schema: dict[str, Any]) -> jsonschema.Validator:
        key = repr(schema.get("$ref")) if set(schema) == {"$ref"} else repr(sorted(schema.items(), key=str))
        validator = self._validators.get(key)
        if validator is None:
            full = copy.deepcopy(schema)
            full["definitions"] = self.definitions
            validator = jsonschema.Draft4Validator(full)
            self._validators[key] = validator
        return validator

    def route(self, method: str, path: str) -> Route:
        method = method.lower()
        path = path.split("?", 1)[0]
        for regex, template, ops in self._routes:
            m = regex.match(path)
            if m is None:
                continue
            op = ops.get(method)
            if op is None:
                raise UnknownRoute(f"{method.upper()} {path}")
            schema, required = None, False
            for param in op.get("parameters", []):
                if param.get("in") == "body":
                    schema = _convert(param["schema"])
                    required = bool(param.get("required", False))
            return Route(template, method.upper(), m.groupdict(), schema, required)
        raise UnknownRoute(f"{method.upper()} {path}")

    def has_route(self, method: str, path: str) -> bool:
        try:
            self.route(method, path)
            return True
        except UnknownRoute:
            return False

    def validate(self, method: str, path: str, body: Any) -> list[str]:
        """Problems with this request according to the spec (empty list = valid)."""
        try:
            route = self.route(method, path)
        except UnknownRoute:
            return [f"{method.upper()} {path} is not an operation of the spec ({self.name})"]
        if route.schema is None:
            return [] if body is None else [f"{route.method} {route.template} takes no body"]
        if body is None:
            return [f"{route.method} {route.template} requires a body"] if route.body_required else []
        validator = self._validator(route.schema)
        return [
            f"{'/'.join(str(p) for p in err.absolute_path) or '<body>'}: {err.message}"
            for err in sorted(validator.iter_errors(body), key=lambda e: list(map(str, e.absolute_path)))
        ]


@functools.cache
def load_spec(version: str) -> FirecrackerSpec:
    return FirecrackerSpec(SPEC_FILES[version], name=f"firecracker.yaml@{version}")


def all_specs() -> list[FirecrackerSpec]:
    return [load_spec(v) for v in SPEC_FILES]


def validate_all(method: str, path: str, body: Any) -> dict[str, list[str]]:
    """{version: problems} for every vendored spec version that rejects the request."""
    problems = {}
    for version in SPEC_FILES:
        errs = load_spec(version).validate(method, path, body)
        if errs:
            problems[version] = errs
    return problems
