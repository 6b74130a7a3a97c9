"""Helpers for the Kubernetes layer's tests: a recording sink, and waiting for a condition."""

from __future__ import annotations

import threading
import time


class RecordingSink:
    """A thread-safe Sink that keeps what a store would, and every call in order, for asserts."""

    def __init__(self):
        self._lock = threading.Condition()
        self.calls: list[tuple] = []
        self.objects: dict[tuple[str, str, str], dict] = {}  # (kind, namespace, name) -> object
        self.synced_sources: list[str] = []
        self._listing: dict[str, list[str]] = {}  # source -> names its list in progress delivered

    @staticmethod
    def _key(obj: dict) -> tuple[str, str, str]:
        meta = obj["metadata"]
        return obj["kind"], meta.get("namespace", ""), meta["name"]

    def upsert(self, obj: dict) -> None:
        with self._lock:
            self.calls.append(("upsert", obj["kind"], obj["metadata"]["name"]))
            self.objects[self._key(obj)] = obj
            self._lock.notify_all()

    def delete(self, obj: dict) -> None:
        with self._lock:
            self.calls.append(("delete", obj["kind"], obj["metadata"]["name"]))
            self.objects.pop(self._key(obj), None)
            self._lock.notify_all()

    def apply(self, upserts: list[dict], deletes: list[dict]) -> None:  # the manifests source's call
        raise AssertionError("the Kubernetes source hands over lists page by page and single events")

    def list_begin(self, source: str) -> None:
        with self._lock:
            self.calls.append(("list_begin", source))
            self._listing[source] = []

    def list_page(self, source: str, objs: list[dict]) -> None:
        with self._lock:
            assert source in self._listing, f"a page of {source} outside a list"
            names = sorted(o["metadata"]["name"] for o in objs)
            self.calls.append(("page", source, names))
            self._listing[source].extend(names)
            for obj in objs:
                self.objects[self._key(obj)] = obj
            self._lock.notify_all()

    def list_end(self, source: str) -> None:
        """Recorded as ("list", source, every name the list held), as a store would end it."""
        with self._lock:
            listed = self._listing.pop(source)
            self.calls.append(("list", source, sorted(listed)))
            for key in [k for k in self.objects if k[0] == source and k[2] not in listed]:
                del self.objects[key]
            self._lock.notify_all()

    def replace(self, source: str, objs: list[dict]) -> None:
        self.list_begin(source)
        self.list_page(source, objs)
        self.list_end(source)

    def synced(self, source: str) -> None:
        with self._lock:
            self.calls.append(("synced", source))
            self.synced_sources.append(source)
            self._lock.notify_all()

    def pod_cgroups(self, mapping: dict[str, int]) -> None:  # the cgroup scan's call; not ours
        raise AssertionError("the Kubernetes source never reports pod cgroups")

    def names(self, kind: str) -> list[str]:
        with self._lock:
            return sorted(k[2] for k in self.objects if k[0] == kind)

    def calls_of(self, what: str, kind: str | None = None) -> list[tuple]:
        with self._lock:
            return [c for c in self.calls if c[0] == what and (kind is None or c[1] == kind)]

    def wait_for(self, predicate, timeout: float = 5.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}; calls: {self.calls[-15:]}")
                self._lock.wait(left)


def wait_until(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
