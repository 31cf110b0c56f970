"""The fleet's registry in Ray's GCS key-value store, and the GCS call that resizes a
node's custom resources. Needs a connected Ray (driver, task or actor).

Ray has no public API for either: `ray.experimental.internal_kv` is what Ray's own
libraries use for small shared state, and `resize_raylet_resource_instances` is the GCS
call Ray's autoscaler uses to change a live node's resources. Both are reached only
here, so a Ray upgrade that moves them is fixed in one place."""

from __future__ import annotations

import json
from typing import Any

import ray
from ray.experimental import internal_kv

__all__ = ["delete", "get_json", "get_text", "keys", "put", "put_json", "put_new", "resize_node_resources"]


def get_text(key: bytes, namespace: str) -> str | None:
    value = internal_kv._internal_kv_get(key, namespace=namespace)
    return value.decode() if value is not None else None


def get_json(key: bytes, namespace: str) -> Any:
    text = get_text(key, namespace)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def put(key: bytes, value: str, namespace: str) -> None:
    internal_kv._internal_kv_put(key, value.encode(), overwrite=True, namespace=namespace)


def put_json(key: bytes, value: Any, namespace: str) -> None:
    put(key, json.dumps(value, sort_keys=True), namespace)


def put_new(key: bytes, value: str, namespace: str) -> bool:
    """Store `value` unless the key exists: True if this call stored it (atomic in the GCS)."""
    existed = internal_kv._internal_kv_put(key, value.encode(), overwrite=False, namespace=namespace)
    return not existed


def delete(key: bytes, namespace: str) -> None:
    internal_kv._internal_kv_del(key, namespace=namespace)


def keys(prefix: str, namespace: str) -> list[str]:
    return sorted(k.decode() for k in internal_kv._internal_kv_list(prefix.encode(), namespace=namespace))


def resize_node_resources(ray_node_id: str, resources: dict[str, float]) -> dict[str, float]:
    """Set the totals of `resources` on a live node (0 removes one); returns the node's
    totals afterwards. Ray never sets a total below what running work holds: the
    answer then shows the held amount, and the caller tries again later."""
    gcs = ray._private.worker.global_worker.gcs_client
    return dict(gcs.resize_raylet_resource_instances(ray_node_id, resources))
