"""The vendored specs are the verbatim upstream files, and the harness reads them as intended."""

from __future__ import annotations

import hashlib

import pytest
from fc_spec import SPEC_DIR, SPEC_FILES, load_spec

SHA256 = {
    "firecracker.yaml": "47cd2801deb84b4fc38b9dcc85fce494b1f93074caf377dfc59cb7d410fb00f9",
    "firecracker-v1.16.1.yaml": "a514abec7b29700c5ca8bdaebbb960e4ffb46fe1fd4869094c6c63630a6fa41c",
    "LICENSE": "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30",
    "NOTICE": "0f443af83ca8226c7ec44e2ade3a09fa3eed8c9b923b6c014b6d439816b6f1c2",
}


@pytest.mark.parametrize("name", sorted(SHA256))
def test_vendored_files_are_unmodified(name) -> None:
    assert hashlib.sha256((SPEC_DIR / name).read_bytes()).hexdigest() == SHA256[name]
    assert name in (SPEC_DIR / "README.md").read_text()


def test_versions_and_yaml12_strings() -> None:
    assert load_spec("HEAD").version == "1.17.0-dev"
    assert load_spec("v1.16.1").version == "1.16.1"
    for version in SPEC_FILES:
        level = load_spec(version).definitions["Logger"]["properties"]["level"]["enum"]
        assert level == ["Error", "Warning", "Info", "Debug", "Trace", "Off"]  # not YAML 1.1's False


def test_every_object_schema_with_properties_is_closed() -> None:
    def walk(node):
        if isinstance(node, dict):
            if "properties" in node:
                assert "additionalProperties" in node, node
            for key, value in node.items():
                if key == "properties":
                    for sub in value.values():
                        walk(sub)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for version in SPEC_FILES:
        walk(load_spec(version).definitions)
    # the free-form ones stay open
    assert load_spec("HEAD").definitions["MmdsContentsObject"]["additionalProperties"] is True


def test_routes() -> None:
    spec = load_spec("HEAD")
    r = spec.route("PATCH", "/network-interfaces/eth0")
    assert r.template == "/network-interfaces/{iface_id}" and r.params == {"iface_id": "eth0"}
    assert spec.route("GET", "/").schema is None
    assert spec.route("PUT", "/snapshot/load").schema == {"$ref": "#/definitions/SnapshotLoadParams"}
