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
- a bad document (unparsable, not an object, unknown kind, no name, nested deeper than MAX_DEPTH,
  more than MAX_VALUES values) is reported once per change of its file, with the file and the
  document index (0-based, counting non-empty documents; an item of a List adds `.items[i]`),
  and skipped: the rest still applies;
- a bad file (unreadable, vanished, not a regular file, over MAX_FILE_BYTES, a symlink loop, not
  UTF-8) is skipped whole, as a file without objects, and reported once per change of what we can
  see of it (its stat, or its link's): it never stops the other files. `bad_files` counts the
  files with a bad document or skipped whole (the meshlet_manifests_bad_files gauge);
- a Route without `metadata.creationTimestamp` gets a synthetic one in the order of the files
  (path, then position): 9000-01-01T00:00:00Z plus one second per such Route before it, so
  "first route" (SEMANTICS B7) means first in the files, and Routes without a timestamp still
  come after those with one, as resolve orders them;
- when the directory itself disappears the last list stays in force (a ConfigMap volume swaps
  its contents by renaming; a missing directory is far more often a transient than an intent).
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import threading
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import yaml

from agent.kinds import ROUTE_KINDS, identify
from agent.logs import get_logger
from agent.sources import ObjectKey, Sink, identity_stub, object_key

log = get_logger("manifests")

SOURCE = "manifests"
SUFFIXES = (".yaml", ".yml", ".json")

#: Base of the synthetic creationTimestamps: far in the future, so that, as resolve orders a Route
#: without timestamp (after every Route that has one, SEMANTICS B7), these still come last.
_SYNTHETIC_EPOCH = datetime(9000, 1, 1, tzinfo=timezone.utc)
_DOCUMENT_START = re.compile(r"^---(?:[ \t].*)?$")
_DOCUMENT_END = re.compile(r"^\.\.\.[ \t]*$")

#: Largest manifest file read (bytes). A Kubernetes object is at most ~1.5 MiB (etcd's limit), so
#: a file above this is not a set of manifests; parsing it would hold the poll for minutes.
MAX_FILE_BYTES = 16 * 1024 * 1024
#: Deepest nesting of one document. Real objects stay below 20 levels; a document deeper than
#: this is refused before anything walks it recursively.
MAX_DEPTH = 100
#: Most values (mappings, lists and scalars, each time it is reached) in one document: a YAML
#: alias "bomb" is small text but expands to billions of values for anything that copies it.
MAX_VALUES = 1_000_000


@dataclass(frozen=True)
class BadDocument:
    file: str
    index: str | None  #: None: the whole file was skipped (it could not be read or parsed)
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

    Which kinds and versions count is agent.kinds' rule (`identify`), kept in one place; a namespaced
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


def oversize(doc: object) -> str | None:
    """Why a parsed document is too big to take (nested deeper than MAX_DEPTH, or more than
    MAX_VALUES values once YAML aliases are expanded), or None. Iterative: it must not itself
    recurse into what it guards against."""
    pending = [(doc, 1)]
    values = 0
    while pending:
        value, depth = pending.pop()
        values += 1
        if values > MAX_VALUES:
            return f"more than {MAX_VALUES} values (YAML aliases expanding?)"
        if depth > MAX_DEPTH:
            return f"nested deeper than {MAX_DEPTH} levels"
        if isinstance(value, dict):
            pending.extend((v, depth + 1) for v in value.values())
            pending.extend((k, depth + 1) for k in value if not isinstance(k, (str, int, float, bool)))
        elif isinstance(value, list):
            pending.extend((v, depth + 1) for v in value)
    return None


def _expand(doc: object, index: str, file: str, objects: list, bad: list) -> None:
    too_big = oversize(doc)
    if too_big is not None:
        bad.append(BadDocument(file, index, too_big))
        return
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
        except RecursionError:
            return FileContents((), (BadDocument(name, "0", "not valid JSON: nested too deeply"),))
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
        except RecursionError:
            bad.append(BadDocument(name, str(index), f"not valid YAML (document starts at line "
                                                     f"{first_line + 1}): nested too deeply"))
            index += 1
            continue
        except Exception as err:  # a value the YAML types refuse (`2024-13-45`, `!!int 0x`): not a YAMLError
            bad.append(BadDocument(name, str(index), f"not valid YAML (document starts at line "
                                                     f"{first_line + 1}): {err}"))
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


@dataclass(frozen=True)
class Listing:
    """One walk of the directory: the manifest files to read, and the entries that cannot be.

    `files`: relative path -> stat signature (inode, size, mtime, ctime) of each regular file to
    read. `broken`: relative path -> (signature, reason) of each entry skipped whole (a symlink
    loop, not a regular file, over the size cap, not stat-able): its signature is what we could
    see of it plus the reason, so it is reported again only when it (or its reason) changes.
    """

    files: dict[str, tuple]
    broken: dict[str, tuple[tuple, str]]

    def signatures(self) -> dict[str, tuple]:
        out = dict(self.files)
        out.update((name, signature) for name, (signature, _) in self.broken.items())
        return dict(sorted(out.items()))


def _lstat_signature(path: str) -> tuple:
    try:
        st = os.lstat(path)
    except OSError:
        return ()
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _kind_of(mode: int) -> str:
    for test, what in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "not a regular file"


def list_manifest_files(directory: Path) -> Listing:
    """Every manifest file below `directory` (names starting with "." left out), in path order.

    Symlinks are followed, each directory is read once: a link back to a directory already read
    (a loop, or a second way to the same place) is reported instead of walked again. An entry that
    disappears while we walk is left to the next poll. The directory itself unreadable or gone
    raises OSError: the poll fails (reported once) and the last list stays in force.
    """
    files: dict[str, tuple] = {}
    broken: dict[str, tuple[tuple, str]] = {}
    top = os.stat(directory)  # gone or unreadable: raised, never an empty listing (the caller keeps its list)
    seen = {(top.st_dev, top.st_ino): "."}
    pending = [""]
    while pending:
        rel_dir = pending.pop()
        try:
            names = sorted(os.listdir(os.path.join(directory, rel_dir)))
        except OSError as err:
            if not rel_dir:
                raise  # the directory itself: never taken for an empty one
            if not isinstance(err, FileNotFoundError):
                broken[rel_dir] = (_lstat_signature(os.path.join(directory, rel_dir)),
                                   f"cannot list this directory: {err.strerror}")
            continue
        subdirs = []
        for name in names:
            if name.startswith("."):
                continue
            rel = os.path.join(rel_dir, name)
            path = os.path.join(directory, rel)
            is_manifest = name.endswith(SUFFIXES)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                if is_manifest and os.path.islink(path):
                    broken[rel] = (_lstat_signature(path), f"a symlink to a missing file ({os.readlink(path)})")
                continue  # else removed while we walked: the next poll sees the rest of the change
            except OSError as err:  # ELOOP (a symlink to itself), EACCES on the way, ...
                if is_manifest:
                    broken[rel] = (_lstat_signature(path), f"cannot stat: {err.strerror}")
                continue
            if stat.S_ISDIR(st.st_mode):
                first = seen.setdefault((st.st_dev, st.st_ino), rel)
                if first != rel:
                    broken[rel] = (_lstat_signature(path), f"leads to a directory already read as {first} "
                                   "(a symlink loop or a second link): not read again")
                else:
                    subdirs.append(rel)
            elif is_manifest:
                signature = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                if not stat.S_ISREG(st.st_mode):
                    broken[rel] = (signature, f"{_kind_of(st.st_mode)}, not a regular file")
                elif st.st_size > MAX_FILE_BYTES:
                    broken[rel] = (signature, f"{st.st_size} bytes, larger than the {MAX_FILE_BYTES} byte cap "
                                   "on a manifest file; split it into several files")
                else:
                    files[rel] = signature
        pending.extend(reversed(subdirs))
    return Listing(dict(sorted(files.items())), dict(sorted(broken.items())))


@dataclass(frozen=True)
class _HeldFile:
    """What the source remembers of a file it applied: never its objects."""

    signature: tuple
    keys: tuple[ObjectKey, ...]  #: the identities its objects have
    untimed_routes: int  #: Routes without creationTimestamp: they take synthetic ones
    route_base: int  #: the synthetic ordinal of its first such Route when it was last read
    bad: int  #: bad documents (or 1 for a file skipped whole), for the gauge and the summary line


@dataclass
class _Change:
    """One poll's work in progress, phase by phase (see ManifestsSource.poll_once)."""

    signatures: dict[str, tuple]  #: every file of the listing, broken ones included
    read: dict[str, FileContents]  #: the files read in this poll (changed, renumbered)
    changed: set[str]  #: read because their signature changed (their bad documents are reported)
    bases: dict[str, int] = field(default_factory=dict)  #: file -> ordinal of its first untimed Route
    newest: dict[str, dict[ObjectKey, dict]] = field(default_factory=dict)  #: file -> its objects now
    holders: dict[ObjectKey, tuple[str, ...]] = field(default_factory=dict)  #: the identities touched

    @property
    def touched(self) -> set[str]:
        """Files read now, and files gone: the ones whose held record this poll replaces."""
        return set(self.read)


class ManifestsSource:
    """Polls a manifests directory and pushes the changes of its objects into a Sink.

    A poll reads only the files whose stat signature changed (plus the few an unchanged file's
    objects depend on, see `poll_once`), upserts their objects, and deletes the identities no file
    holds any more: one `sink.apply` per poll, so the loop sees a poll whole. Per file it keeps
    the signature and the identities, per identity the files holding it (later file wins).
    `bad_files` is the number of files with at least one bad document, or skipped whole, now;
    `on_bad_files` (if given) is called with it after every poll that applied something.
    """

    def __init__(self, directory: Path, sink: Sink, poll_interval: float = 0.2,
                 on_bad_files: Callable[[int], None] | None = None):
        self.directory = Path(directory)
        self.sink = sink
        self.poll_interval = poll_interval
        self.on_bad_files = on_bad_files
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listed = False  #: a full read has been delivered
        self._held: dict[str, _HeldFile] = {}
        self._holders: dict[ObjectKey, tuple[str, ...]] = {}  #: identity -> files, sorted; last wins
        self._last_error: str | None = None  #: the last unexpected poll error, logged once

    @property
    def bad_files(self) -> int:
        return sum(1 for held in self._held.values() if held.bad)

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
                self._last_error = None
            except Exception as err:  # a source never dies: report (once per distinct error), poll again
                if repr(err) != self._last_error:
                    log.error("manifests.error", dir=str(self.directory), error=repr(err))
                    self._last_error = repr(err)
            self._stop.wait(self.poll_interval)

    def poll_once(self) -> bool:
        """Apply what changed in the directory; True once a full read has been delivered.

        Phases: list the directory; read the changed files (a file caught mid-write or gone keeps
        its last state until the next poll, the rest applies now); number the Routes without
        creationTimestamp, reading again an unchanged file whose Routes must be renumbered because
        Routes were added or removed before it; work out which file holds each touched identity
        now, reading again an unchanged file that becomes the winner of an identity a later file
        dropped (the source keeps no objects, only where they are); push the difference as one
        step; report the bad files and documents read; remember what was read.

        A file that cannot be read or parsed (unreadable, not a regular file, over the size cap,
        a symlink loop, not UTF-8, nested too deeply) counts as a file with no objects and one
        bad document, reported once per change of the file: it never stops the rest.
        """
        if not self.directory.is_dir():
            if self._listed:
                log.warning("manifests.dir_missing", dir=str(self.directory), keeping="last list")
            return self._listed
        listing = list_manifest_files(self.directory)
        signatures = listing.signatures()
        if self._listed and signatures == {name: held.signature for name, held in self._held.items()}:
            return True
        change = self._read_changed(listing)
        if not self._number_routes(change):
            return self._listed
        self._find_holders(change)
        if not self._read_new_winners(change):
            return self._listed
        upserts, deletes = self._difference(change)
        self._report_bad(change)
        self.sink.apply(upserts, deletes)
        self._remember(change)
        self._listed = True
        bad_files = self.bad_files
        if self.on_bad_files is not None:
            self.on_bad_files(bad_files)
        log.info("manifests.read", dir=str(self.directory), files=len(signatures), read=len(change.read),
                 objects=len(self._holders), upserted=len(upserts), deleted=len(deletes),
                 bad=sum(held.bad for held in self._held.values()), bad_files=bad_files)
        return True

    # --- the phases of a poll ---------------------------------------------------------------------

    def _read_changed(self, listing: Listing) -> _Change:
        """Read each file whose signature changed. One caught mid-write (or gone meanwhile) is
        left as it was for this poll: a new one is not listed yet, a known one keeps its last
        state, and the next poll reads it again."""
        signatures = listing.signatures()
        read: dict[str, FileContents] = {}
        for name, signature in list(signatures.items()):
            held = self._held.get(name)
            if held is not None and held.signature == signature:
                continue
            if name in listing.broken:
                contents = FileContents((), (BadDocument(name, None, listing.broken[name][1]),))
            else:
                contents = self._read(name, signature)
            if contents is not None:
                read[name] = contents
            elif held is not None:
                signatures[name] = held.signature
            else:
                del signatures[name]
        return _Change(signatures, read, set(read))

    def _number_routes(self, change: _Change) -> bool:
        """The synthetic ordinal of each file's first untimed Route (files in path order); read
        again an unchanged file whose Routes move. False: such a file could not be read whole."""
        running = 0
        for name in change.signatures:
            change.bases[name] = running
            running += (_untimed_routes(change.read[name].objects) if name in change.read
                        else self._held[name].untimed_routes)
        for name, held in self._held.items():
            if name in change.signatures and name not in change.read and held.untimed_routes \
                    and held.route_base != change.bases[name]:
                contents = self._read(name, change.signatures[name])
                if contents is None:
                    return False  # caught mid-write: the whole change again at the next poll
                change.read[name] = contents
        change.newest = {name: _last_of_each(order_routes(list(contents.objects), change.bases[name]))
                         for name, contents in change.read.items()}
        return True

    def _find_holders(self, change: _Change) -> None:
        """Per identity the files read now or forgotten touch: the files holding it after this poll."""
        gone = self._held.keys() - change.signatures.keys()
        touched = change.touched | gone
        incoming: dict[ObjectKey, list[str]] = {}  # identity -> the files read now that hold it
        for name in sorted(change.newest):
            for key in change.newest[name]:
                incoming.setdefault(key, []).append(name)
        keys = set(incoming)
        for name in touched & self._held.keys():
            keys.update(self._held[name].keys)
        for key in keys:
            before = self._holders.get(key, ())
            change.holders[key] = tuple(sorted({n for n in before if n not in touched}.union(incoming.get(key, ()))))

    def _read_new_winners(self, change: _Change) -> bool:
        """Read the unchanged files that hold an identity again because a later file dropped it.
        False: one changed or became unreadable since it was listed (the next poll reads it as a
        changed file, with the rest of this change)."""
        winners = {after[-1] for key, after in change.holders.items()
                   if after and after[-1] not in change.newest
                   and (not self._holders.get(key) or self._holders[key][-1] != after[-1])}
        for name in winners:
            contents = self._read(name, change.signatures[name])
            change.newest[name] = (_last_of_each(order_routes(list(contents.objects), change.bases[name]))
                                   if contents else {})
            if contents is None or any(after and after[-1] == name and key not in change.newest[name]
                                       for key, after in change.holders.items()):
                self._held[name] = replace(self._held[name], signature=())
                return False
        return True

    def _difference(self, change: _Change) -> tuple[list[dict], list[dict]]:
        """The objects to upsert (each identity's winning file's object) and the identities to delete."""
        upserts, deletes = [], []
        for key, after in change.holders.items():
            if not after:
                deletes.append(identity_stub(key))
            elif after[-1] in change.newest:
                upserts.append(change.newest[after[-1]][key])
            if len(after) > 1 and (set(after) & change.changed):
                log.warning("manifests.duplicate", kind=key[1], namespace=key[2], name=key[3],
                            files=",".join(after), applied=after[-1])
        return upserts, deletes

    def _report_bad(self, change: _Change) -> None:
        """One line per bad file or document of the files that changed: never again until they change."""
        for name in sorted(change.changed):
            for doc in change.read[name].bad:
                if doc.index is None:
                    log.warning("manifests.bad_file", file=doc.file, error=doc.error)
                else:
                    log.warning("manifests.bad_document", file=doc.file, index=doc.index, error=doc.error)

    def _remember(self, change: _Change) -> None:
        for name in self._held.keys() - change.signatures.keys():
            del self._held[name]
        for name, contents in change.read.items():
            self._held[name] = _HeldFile(change.signatures[name], tuple(change.newest[name]),
                                         _untimed_routes(contents.objects), change.bases[name], len(contents.bad))
        for key, after in change.holders.items():
            if after:
                self._holders[key] = after
            else:
                del self._holders[key]

    def _read(self, name: str, signature: tuple) -> FileContents | None:
        """The file's contents (a file that cannot be read or parsed gives one bad document), or
        None when it changed or went away while we read it (a writer at work: the next poll reads
        the finished file instead of applying half of it)."""
        try:
            data, st = read_capped(self.directory / name, MAX_FILE_BYTES)
        except FileNotFoundError:
            return None
        except OSError as err:
            return FileContents((), (BadDocument(name, None, f"cannot read: {err.strerror or err}"),))
        if (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != signature:
            return None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            return FileContents((), (BadDocument(name, None, f"not UTF-8 text (byte {err.start}: {err.reason})"),))
        try:
            return parse_manifest(name, text)
        except Exception as err:  # parse_manifest reports what it knows; anything else skips the file alone
            return FileContents((), (BadDocument(name, None, f"cannot parse: {err!r}"),))


def read_capped(path: Path, cap: int) -> tuple[bytes, os.stat_result]:
    """The bytes of a regular file (at most cap + 1 of them) and its stat, taken after the read.

    Opened non-blocking, so a FIFO put in place of the file after the listing cannot hang the poll.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"{_kind_of(st.st_mode)}, not a regular file")
        chunks, total = [], 0
        while total <= cap:
            chunk = os.read(fd, min(1 << 20, cap + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks), os.fstat(fd)
    finally:
        os.close(fd)


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
