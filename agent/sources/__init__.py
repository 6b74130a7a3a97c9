"""Sources: the outside world as plain object dicts, pushed into a Sink.

A source (the Kubernetes API, a manifests directory, the pod cgroups under the cgroup root) runs
in its own thread and knows nothing of resolve or the datapath: it only calls the Sink below.
The runtime's store (agent.runtime.store.Store) is the one Sink implementation.

Contract for every source:
- objects are dicts exactly as the API server returns them (apiVersion, kind, metadata, ...);
- `replace(source, objs)` is a full (re)list of that source: the sink deletes what the source
  gave before and is not in `objs`;
- `synced(source)` is called once its first full list is complete (SEMANTICS A15: nothing is
  programmed before every source has synced);
- `upsert(obj)` / `delete(obj)` belong to the source that listed that object's kind last (or, for
  a kind never listed, to the source named after the kind: the Kubernetes source names its
  sources after kinds, "Service", "EndpointSlice", ...);
- `pod_cgroups(mapping)` is the full set of pod uid -> pod cgroup id found on this node; its first
  call is the cgroup scan's `synced(POD_CGROUPS)`.
"""

from __future__ import annotations

from typing import Protocol

#: The identity of an object: (API group, kind, namespace, name). Versions of one kind share it.
ObjectKey = tuple[str, str, str, str]


def object_key(obj: dict) -> ObjectKey:
    api_version = obj.get("apiVersion") or ""
    group = api_version.rpartition("/")[0]
    meta = obj.get("metadata") or {}
    return (group, str(obj.get("kind") or ""), str(meta.get("namespace") or ""), str(meta.get("name") or ""))


#: The source name under which the pod cgroup scan counts as synced (its first `pod_cgroups` call).
POD_CGROUPS = "pod-cgroups"


class Sink(Protocol):
    def upsert(self, obj: dict) -> None: ...

    def delete(self, obj: dict) -> None: ...

    def replace(self, source: str, objs: list[dict]) -> None:
        """A full (re)list of one source: objects of `source` not in `objs` are deleted."""

    def synced(self, source: str) -> None:
        """The first full list of `source` is complete."""

    def pod_cgroups(self, mapping: dict[str, int]) -> None:
        """The full set of pod uid -> pod cgroup id on this node."""
