"""Sources: the outside world as plain object dicts, pushed into a Sink.

A source (the Kubernetes API, a manifests directory, the pod cgroups under the cgroup root) runs
in its own thread and knows nothing of resolve or the datapath: it only calls the Sink below.
The runtime's store (agent.runtime.store.Store) is the one Sink implementation. A source keeps
no copy of the objects it delivered: once handed over they belong to the sink (which hands them
on to the resolver and forgets them, see the store).

Contract for every source:
- objects are dicts exactly as the API server returns them (apiVersion, kind, metadata, ...);
- `metadata.resourceVersion`, when present, is the API server's version of the object: two
  objects with one identity and one resourceVersion are the same object, and the sink may skip
  the second as unchanged (a relist repeats nearly every object). A source whose objects do not
  come from an API server (the manifests directory) drops the field, since an edited manifest
  may keep the number it was exported with;
- a (re)list is delivered as it arrives: `list_begin(source)`, then `list_page(source, objs)` per
  page, then `list_end(source)`, at which the sink deletes the objects of `source` that the list
  did not contain. `replace(source, objs)` is the same in one call. A list that fails midway is
  begun again: what its pages delivered stands (each object is one the server held);
- `apply(upserts, deletes)`: several changes as one step (the loop takes all of them or none);
- `upsert(obj)` / `delete(obj)` belong to the source that listed that object's kind last (or, for
  a kind never listed, to the source named after the kind: the Kubernetes source names its
  sources after kinds, "Service", "EndpointSlice", ...); a delete reads only the object's
  identity, so `identity_stub(key)` will do when the object itself is no longer at hand;
- `synced(source)` is called once its first full list is complete (SEMANTICS A15: nothing is
  programmed before every source has synced);
- `pod_cgroups(mapping)` is the full set of pod uid -> pod cgroup id found on this node; its first
  call is the cgroup scan's `synced(POD_CGROUPS)`.
"""

from __future__ import annotations

import sys
from typing import Protocol

#: The identity of an object: (API group, kind, namespace, name). Versions of one kind share it.
ObjectKey = tuple[str, str, str, str]


def object_key(obj: dict) -> ObjectKey:
    # Any JSON may arrive here (resolve reports what is unusable): never assume a field's type.
    api_version = obj.get("apiVersion")
    api_version = api_version if isinstance(api_version, str) else ""
    # Interned: the store keeps one key per object of the cluster, and a group, a kind or a
    # namespace is one of a few (each parsed object brings its own copy of them).
    group = sys.intern(api_version.rpartition("/")[0])
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    return (group, sys.intern(str(obj.get("kind") or "")), sys.intern(str(meta.get("namespace") or "")),
            str(meta.get("name") or ""))


def identity_stub(key: ObjectKey, api_version: str | None = None) -> dict:
    """The least object that names `key`, for a delete: apiVersion, kind, metadata name and
    namespace. Without `api_version`, the group's v1 (every group meshlet reads serves one)."""
    group, kind, namespace, name = key
    if api_version is None:
        api_version = f"{group}/v1" if group else "v1"
    meta = {"name": name, "namespace": namespace} if namespace else {"name": name}
    return {"apiVersion": api_version, "kind": kind, "metadata": meta}


#: The source name under which the pod cgroup scan counts as synced (its first `pod_cgroups` call).
POD_CGROUPS = "pod-cgroups"


class Sink(Protocol):
    def upsert(self, obj: dict) -> None: ...

    def delete(self, obj: dict) -> None:
        """Only the identity is read (`object_key`)."""

    def apply(self, upserts: list[dict], deletes: list[dict]) -> None:
        """Several changes as one step: the loop takes all of them or none."""

    def list_begin(self, source: str) -> None:
        """A (re)list of `source` starts."""

    def list_page(self, source: str, objs: list[dict]) -> None:
        """Objects of the list in progress, as they arrive."""

    def list_end(self, source: str) -> None:
        """The list is complete: objects of `source` it did not contain are deleted."""

    def replace(self, source: str, objs: list[dict]) -> None:
        """A whole (re)list in one call: list_begin, list_page(objs), list_end."""

    def synced(self, source: str) -> None:
        """The first full list of `source` is complete."""

    def pod_cgroups(self, mapping: dict[str, int]) -> None:
        """The full set of pod uid -> pod cgroup id on this node."""
