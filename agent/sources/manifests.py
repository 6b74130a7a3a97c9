"""The manifests source: a directory of YAML/JSON manifests as the cluster (the embedded default).

Role: every `*.yaml`, `*.yml` and `*.json` file below the directory (multi-document; a document
may be a `List`), read at start and re-read within a second of a change (a stat poll: no inotify
needed, and it sees changes on every filesystem, ConfigMap volumes included). Each poll pushes
what changed as one step, `sink.apply(upserts, deletes)`: the objects of the files read again,
and the identities no file holds any more; `sink.synced("manifests")` follows the first read.
The source keeps no objects (the resolver holds them): per file its stat signature and the
identities it held, per identity the files holding it.

May touch: the files below the directory (read only), nothing else. Names starting with "." are
ignored (editor swap files; the `..data` links of a ConfigMap volume, whose files are seen through
their visible names).

Invariants:
- the sink holds, per identity, the object of the last file (by path) that has it, at its last
  position there: "later file wins", as a second `kubectl apply` would; a repeat is reported;
- `metadata.resourceVersion` is dropped from every object: a manifest is no API server, and an
  edited object that kept its exported number must still count as changed (agent.sources);
- a bad document (unparsable, not an object, unknown kind, no name) is reported once per change of
  its file, with the file and the document index (0-based, counting non-empty documents; an item
  of a List adds `.items[i]`), and skipped: the rest still applies;
- a Route without `metadata.creationTimestamp` gets a synthetic one in the order of the files
  (path, then position): 9000-01-01T00:00:00Z plus one second per such Route before it, so
  "first route" (SEMANTICS B7) means first in the files, and Routes without a timestamp still
  come after those with one, as resolve orders them;
- when the directory itself disappears the last list stays in force (a ConfigMap volume swaps
  its contents by renaming; a missing directory is far more often a transient than an intent).
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml

from agent.runtime.logs import get_logger
from agent.resolve.objects import ROUTE_KINDS, identify
from agent.sources import ObjectKey, Sink, identity_stub, object_key

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
    object without namespace lands in "default", as `kubectl apply` would put it; a
    resourceVersion is dropped (see the module docstring)."""
    key, why = identify(doc)
    if key is None:
        return None, why
    meta = doc["metadata"]
    if (key.namespace and meta.get("namespace") != key.namespace) or "resourceVersion" in meta:
        meta = {k: v for k, v in meta.items() if k != "resourceVersion"}
        if key.namespace:
            meta["namespace"] = key.namespace
        return {**doc, "metadata": meta}, None
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


def order_routes(objects: list[dict], first: int = 0) -> list[dict]:
    """Give each Route without creationTimestamp a synthetic one, in list order (file, position),
    numbered from `first` (the number of such Routes in the files before these objects)."""
    out, ordinal = [], first
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


@dataclass(frozen=True)
class _HeldFile:
    """What the source remembers of a file it applied: never its objects."""

    signature: tuple
    keys: tuple[ObjectKey, ...]  #: the identities its objects have
    untimed_routes: int  #: Routes without creationTimestamp: they take synthetic ones
    route_base: int  #: the synthetic ordinal of its first such Route when it was last read
    bad: int  #: bad documents, for the summary line


class ManifestsSource:
    """Polls a manifests directory and pushes the changes of its objects into a Sink.

    A poll reads only the files whose stat signature changed (plus the few an unchanged file's
    objects depend on, see `poll_once`), upserts their objects, and deletes the identities no file
    holds any more: one `sink.apply` per poll, so the loop sees a poll whole. Per file it keeps
    the signature and the identities, per identity the files holding it (later file wins).
    """

    def __init__(self, directory: Path, sink: Sink, poll_interval: float = 0.2):
        self.directory = Path(directory)
        self.sink = sink
        self.poll_interval = poll_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listed = False  #: a full read has been delivered
        self._held: dict[str, _HeldFile] = {}
        self._holders: dict[ObjectKey, tuple[str, ...]] = {}  #: identity -> files, sorted; last wins

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
        """Apply what changed in the directory; True once a full read has been delivered.

        Nothing is applied unless every file the change needs was read whole (a file changing
        while read is a writer at work: the next poll tries again), so the sink never sees half
        a change. Besides the changed files, a poll reads again (1) an unchanged file whose
        Routes without creationTimestamp must be renumbered because Routes were added or removed
        before it, and (2) an unchanged file that becomes the winner of an identity a later file
        dropped: the source keeps no objects, only where they are.
        """
        if not self.directory.is_dir():
            if self._listed:
                log.warning("manifests.dir_missing", dir=str(self.directory), keeping="last list")
            return self._listed
        files = list_manifest_files(self.directory)
        if self._listed and files == {name: held.signature for name, held in self._held.items()}:
            return True
        read: dict[str, FileContents] = {}
        for name, signature in files.items():
            held = self._held.get(name)
            if held is None or held.signature != signature:
                contents = self._read(name, signature)
                if contents is None:
                    return self._listed  # mid-write: try the whole change again soon
                read[name] = contents
        changed = set(read)
        bases, running = {}, 0
        for name in files:
            bases[name] = running
            running += _untimed_routes(read[name].objects) if name in read else self._held[name].untimed_routes
        for name, held in self._held.items():
            if name in files and name not in read and held.untimed_routes and held.route_base != bases[name]:
                contents = self._read(name, files[name])
                if contents is None:
                    return self._listed
                read[name] = contents
        newest = {name: _last_of_each(order_routes(list(read[name].objects), bases[name])) for name in read}

        touched = set(read) | (self._held.keys() - files.keys())
        incoming: dict[ObjectKey, list[str]] = {}  # identity -> the files read now that hold it
        for name in sorted(newest):
            for key in newest[name]:
                incoming.setdefault(key, []).append(name)
        keys = set(incoming)
        for name in touched & self._held.keys():
            keys.update(self._held[name].keys)
        holders: dict[ObjectKey, tuple[str, ...]] = {}
        winners_to_read: set[str] = set()
        for key in keys:
            before = self._holders.get(key, ())
            after = tuple(sorted({n for n in before if n not in touched}.union(incoming.get(key, ()))))
            holders[key] = after
            if after and after[-1] not in newest and (not before or before[-1] != after[-1]):
                winners_to_read.add(after[-1])  # a later file dropped it: the earlier one wins again
        for name in winners_to_read:
            contents = self._read(name, files[name])
            newest[name] = _last_of_each(order_routes(list(contents.objects), bases[name])) if contents else {}
            if contents is None or any(after and after[-1] == name and key not in newest[name]
                                       for key, after in holders.items()):
                # It changed or became unreadable since it was listed: the next poll reads it
                # as a changed file (its signature forgotten), with the rest of this change.
                self._held[name] = replace(self._held[name], signature=())
                return self._listed

        upserts, deletes = [], []
        for key, after in holders.items():
            if not after:
                deletes.append(identity_stub(key))
            elif after[-1] in newest:
                upserts.append(newest[after[-1]][key])
            if len(after) > 1 and (set(after) & changed):
                log.warning("manifests.duplicate", kind=key[1], namespace=key[2], name=key[3],
                            files=",".join(after), applied=after[-1])
        for name in sorted(changed):
            for doc in read[name].bad:
                log.warning("manifests.bad_document", file=doc.file, index=doc.index, error=doc.error)
        self.sink.apply(upserts, deletes)

        for name in touched:
            if name in read:
                self._held[name] = _HeldFile(files[name], tuple(newest[name]), _untimed_routes(read[name].objects),
                                             bases[name], len(read[name].bad))
            else:
                del self._held[name]
        for key, after in holders.items():
            if after:
                self._holders[key] = after
            else:
                del self._holders[key]
        self._listed = True
        log.info("manifests.read", dir=str(self.directory), files=len(files), read=len(read),
                 objects=len(self._holders), upserted=len(upserts), deleted=len(deletes),
                 bad=sum(held.bad for held in self._held.values()))
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


def _untimed_routes(objects) -> int:
    return sum(1 for obj in objects
               if obj.get("kind") in ROUTE_KINDS and not (obj.get("metadata") or {}).get("creationTimestamp"))


def _last_of_each(objects: list[dict]) -> dict[ObjectKey, dict]:
    """Identity -> object; of two with one identity in a file the later wins, as a second
    `kubectl apply` would (the repeat is reported)."""
    out: dict[ObjectKey, dict] = {}
    for obj in objects:
        key = object_key(obj)
        if key in out:
            log.warning("manifests.duplicate", kind=key[1], namespace=key[2], name=key[3])
        out[key] = obj
    return out
