"""The manifests source: a directory of YAML/JSON manifests as the cluster (the embedded default).

Role: every `*.yaml`, `*.yml` and `*.json` file below the directory (multi-document; a document
may be a `List`), read at start and re-read within a second of a change (a stat poll: no inotify
needed, and it sees changes on every filesystem, ConfigMap volumes included). The result is
pushed as one full list: `sink.replace("manifests", objects)`, then `sink.synced("manifests")`
after the first read.

May touch: the files below the directory (read only), nothing else. Names starting with "." are
ignored (editor swap files; the `..data` links of a ConfigMap volume, whose files are seen through
their visible names).

Invariants:
- a bad document (unparsable, not an object, unknown kind, no name) is reported once per change of
  its file, with the file and the document index (0-based, counting non-empty documents; an item
  of a List adds `.items[i]`), and skipped: the rest still applies;
- the objects come in a stable order (file path, then position); a Route without
  `metadata.creationTimestamp` gets a synthetic one in that order (9000-01-01T00:00:00Z plus one
  second per such Route), so "first route" (SEMANTICS B7) means first in the files, and Routes
  without a timestamp still come after those with one, as resolve orders them;
- when the directory itself disappears the last list stays in force (a ConfigMap volume swaps
  its contents by renaming; a missing directory is far more often a transient than an intent).
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml

from agent.runtime.logs import get_logger
from agent.resolve.objects import ROUTE_KINDS, identify
from agent.sources import Sink, object_key

log = get_logger("manifests")

SOURCE = "manifests"
SUFFIXES = (".yaml", ".yml", ".json")

#: Base of the synthetic creationTimestamps: far in the future, so that, as resolve orders a Route
#: without timestamp (after every Route that has one, SEMANTICS B7), these still come last.
_SYNTHETIC_EPOCH = datetime(9000, 1, 1, tzinfo=timezone.utc)
_DOCUMENT_START = re.compile(r"^---(?:[ \t].*)?$")
_DOCUMENT_END = re.compile(r"^\.\.\.[ \t]*$")


@dataclass(frozen=True)
class BadDocument:
    file: str
    index: str
    error: str


@dataclass(frozen=True)
class FileContents:
    objects: tuple[dict, ...]
    bad: tuple[BadDocument, ...]


# --- pure: text -> objects ----------------------------------------------------------------------


def split_yaml_documents(text: str) -> list[tuple[int, str]]:
    """Split a YAML stream at its `---` / `...` markers into (first line number, 0-based; text),
    so one broken document cannot hide the documents after it (a YAML parser stops at the first
    error)."""
    docs: list[tuple[int, str]] = []
    current: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(keepends=True)):
        bare = line.rstrip("\r\n")
        if _DOCUMENT_START.match(bare):
            docs.append((start, "".join(current)))
            rest = bare[3:].strip()
            # `--- {kind: ...}`: content on the marker line belongs to the new document.
            current = [rest + "\n"] if rest and not rest.startswith("#") else []
            start = number if current else number + 1
        elif _DOCUMENT_END.match(bare):
            docs.append((start, "".join(current)))
            current, start = [], number + 1
        else:
            current.append(line)
    docs.append((start, "".join(current)))
    return docs


def _yaml_error(err: yaml.YAMLError, first_line: int) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    where = f"document starts at line {first_line + 1}"
    if mark is not None:
        where = f"line {first_line + mark.line + 1}, {where}"
    return f"not valid YAML ({where}): {' '.join(problem.split())}"


def check_object(doc: object) -> tuple[dict | None, str | None]:
    """(object ready to apply, None) or (None, why it is skipped).

    Which kinds and versions count is resolve's rule (`identify`), kept in one place; a namespaced
    object without namespace lands in "default", as `kubectl apply` would put it."""
    key, why = identify(doc)
    if key is None:
        return None, why
    meta = doc["metadata"]
    if key.namespace and meta.get("namespace") != key.namespace:
        return {**doc, "metadata": {**meta, "namespace": key.namespace}}, None
    return doc, None


def _expand(doc: object, index: str, file: str, objects: list, bad: list) -> None:
    if isinstance(doc, dict) and isinstance(doc.get("kind"), str) and doc["kind"].endswith("List") \
            and isinstance(doc.get("items"), list):
        for i, item in enumerate(doc["items"]):
            _expand(item, f"{index}.items[{i}]", file, objects, bad)
        return
    obj, why = check_object(doc)
    if obj is None:
        bad.append(BadDocument(file, index, why))
    else:
        objects.append(obj)


def parse_manifest(name: str, text: str) -> FileContents:
    """The objects of one file and its bad documents; `name` is what reports call the file."""
    objects: list[dict] = []
    bad: list[BadDocument] = []
    if name.endswith(".json"):
        try:
            value = json.loads(text) if text.strip() else None
        except ValueError as err:
            return FileContents((), (BadDocument(name, "0", f"not valid JSON: {err}"),))
        values = value if isinstance(value, list) else [] if value is None else [value]
        for i, doc in enumerate(values):
            _expand(doc, str(i), name, objects, bad)
        return FileContents(tuple(objects), tuple(bad))
    index = 0
    for first_line, chunk in split_yaml_documents(text):
        try:
            doc = yaml.safe_load(chunk)
        except yaml.YAMLError as err:
            bad.append(BadDocument(name, str(index), _yaml_error(err, first_line)))
            index += 1
            continue
        if doc is None:  # empty, or comments only: not a document
            continue
        _expand(doc, str(index), name, objects, bad)
        index += 1
    return FileContents(tuple(objects), tuple(bad))


def order_routes(objects: list[dict]) -> list[dict]:
    """Give each Route without creationTimestamp a synthetic one, in list order (file, position)."""
    out, ordinal = [], 0
    for obj in objects:
        meta = obj.get("metadata") or {}
        if obj.get("kind") in ROUTE_KINDS and not meta.get("creationTimestamp"):
            stamp = (_SYNTHETIC_EPOCH + timedelta(seconds=ordinal)).strftime("%Y-%m-%dT%H:%M:%SZ")
            obj = {**obj, "metadata": {**meta, "creationTimestamp": stamp}}
            ordinal += 1
        out.append(obj)
    return out


# --- I/O: the directory poll ----------------------------------------------------------------------


def list_manifest_files(directory: Path) -> dict[str, tuple]:
    """Relative path -> stat signature of every manifest file below `directory` (sorted walk)."""
    found: dict[str, tuple] = {}
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or not name.endswith(SUFFIXES):
                continue
            path = os.path.join(root, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue  # removed while we walked: the next poll sees the rest of the change
            found[os.path.relpath(path, directory)] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return dict(sorted(found.items()))


class ManifestsSource:
    """Polls a manifests directory and pushes its objects into a Sink."""

    def __init__(self, directory: Path, sink: Sink, poll_interval: float = 0.2):
        self.directory = Path(directory)
        self.sink = sink
        self.poll_interval = poll_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._files: dict[str, tuple] | None = None  # signatures of the last read
        self._cache: dict[str, tuple[tuple, FileContents]] = {}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="manifests", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _run(self) -> None:
        first = True
        while not self._stop.is_set():
            try:
                if self.poll_once() and first:
                    self.sink.synced(SOURCE)
                    first = False
            except Exception as err:  # a source never dies: report and poll again
                log.error("manifests.error", dir=str(self.directory), error=repr(err))
            self._stop.wait(self.poll_interval)

    def poll_once(self) -> bool:
        """Read the directory if anything changed; True once a full list has been delivered."""
        if not self.directory.is_dir():
            if self._files is not None:
                log.warning("manifests.dir_missing", dir=str(self.directory), keeping="last list")
            return self._files is not None
        files = list_manifest_files(self.directory)
        if files == self._files:
            return True
        objects: list[dict] = []
        bad = 0
        for name, signature in files.items():
            cached = self._cache.get(name)
            if cached is None or cached[0] != signature:
                contents = self._read(name, signature)
                if contents is None:
                    return self._files is not None  # mid-write: try the whole list again soon
                for doc in contents.bad:
                    log.warning("manifests.bad_document", file=doc.file, index=doc.index, error=doc.error)
                cached = self._cache[name] = (signature, contents)
            objects.extend(cached[1].objects)
            bad += len(cached[1].bad)
        for gone in self._cache.keys() - files.keys():
            del self._cache[gone]
        objects = order_routes(_last_wins(objects))
        self.sink.replace(SOURCE, objects)
        log.info("manifests.read", dir=str(self.directory), files=len(files), objects=len(objects), bad=bad)
        self._files = files
        return True

    def _read(self, name: str, signature: tuple) -> FileContents | None:
        """The file's contents, or None when it changed while we read it (a writer at work:
        the next poll reads the finished file instead of applying half of it)."""
        path = self.directory / name
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
                st = os.fstat(f.fileno())
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as err:
            return FileContents((), (BadDocument(name, "0", f"cannot read: {err}"),))
        if (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != signature:
            return None
        return parse_manifest(name, text)


def _last_wins(objects: list[dict]) -> list[dict]:
    """One object per identity; a later one (by file, then position) replaces an earlier one,
    as a second `kubectl apply` would, and the repeat is reported."""
    seen: dict[tuple, int] = {}
    out: list[dict | None] = []
    for obj in objects:
        key = object_key(obj)
        if key in seen:
            log.warning("manifests.duplicate", kind=obj["kind"], namespace=key[2], name=key[3])
            out[seen[key]] = None
        seen[key] = len(out)
        out.append(obj)
    return [obj for obj in out if obj is not None]
