"""The manifests source: parsing, bad documents reported and skipped, changes seen within 1 s."""

import json
import logging
import os
import threading
import time

import pytest

from pathlib import Path

from agent.sources import manifests, object_key
from agent.sources.manifests import SOURCE, ManifestsSource, order_routes, parse_manifest, split_yaml_documents

SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: mesh}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
"""

ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: %s, namespace: mesh}
spec: {parentRefs: [{kind: Service, group: "", name: echo}]}
"""


class RecordingSink:
    """Stand-in for the runtime's Store: holds what a store would, and records each step pushed."""

    def __init__(self):
        self.objects: dict[tuple, dict] = {}
        self.steps: list[tuple[list, list]] = []  # (upserted (kind, name), deleted (kind, name))
        self.synced_sources: list[str] = []
        self.changed = threading.Event()
        self.synced_event = threading.Event()

    def apply(self, upserts, deletes):
        for obj in deletes:
            assert object_key(obj) in self.objects, f"deleted what was never upserted: {obj}"
            del self.objects[object_key(obj)]
        for obj in upserts:
            self.objects[object_key(obj)] = obj
        self.steps.append((sorted((o["kind"], o["metadata"]["name"]) for o in upserts),
                           sorted((o["kind"], o["metadata"]["name"]) for o in deletes)))
        self.changed.set()

    def upsert(self, obj):
        raise AssertionError("the manifests source pushes one step per poll (apply)")

    delete = list_begin = list_page = list_end = replace = upsert

    def synced(self, source):
        assert source == SOURCE
        self.synced_sources.append(source)
        self.synced_event.set()

    def pod_cgroups(self, mapping):
        raise AssertionError("not a cgroup source")

    def names(self):
        return sorted((o["kind"], o["metadata"]["name"]) for o in self.objects.values())

    def get(self, kind, name, namespace="mesh"):
        (obj,) = [o for k, o in self.objects.items() if k[1:] == (kind, namespace, name)]
        return obj


def test_bad_document_is_reported_with_file_and_index_and_the_rest_applies(tmp_path, caplog):
    (tmp_path / "a.yaml").write_text(SERVICE + "---\nkind: [unclosed\n---\n" + ROUTE % "r1"
                                     + "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n")
    sink = RecordingSink()
    with caplog.at_level(logging.WARNING):
        assert ManifestsSource(tmp_path, sink).poll_once()
    assert sink.names() == [("HTTPRoute", "r1"), ("Service", "echo")]
    bad = [r for r in caplog.records if getattr(r, "meshlet_event", "") == "manifests.bad_document"]
    assert [(r.meshlet_fields["file"], r.meshlet_fields["index"]) for r in bad] == [("a.yaml", "1"), ("a.yaml", "3")]
    assert "document starts at line 6" in bad[0].meshlet_fields["error"]
    assert "Deployment" in bad[1].meshlet_fields["error"]


def test_yaml_json_and_lists_below_subdirectories(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "svc.yml").write_text(SERVICE)
    (tmp_path / "list.json").write_text(json.dumps({
        "apiVersion": "v1", "kind": "List",
        "items": [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "mesh"}},
                  {"kind": "Broken"}],
    }))
    (tmp_path / "notes.txt").write_text("kind: Service\n")
    (tmp_path / ".swap.yaml").write_text(SERVICE.replace("echo", "hidden"))
    sink = RecordingSink()
    ManifestsSource(tmp_path, sink).poll_once()
    assert sink.names() == [("Namespace", "mesh"), ("Service", "echo")]
    assert parse_manifest("list.json", (tmp_path / "list.json").read_text()).bad[0].index == "0.items[1]"


def test_namespaced_object_without_namespace_lands_in_default():
    (obj,) = parse_manifest("x.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n").objects
    assert obj["metadata"]["namespace"] == "default"


def test_routes_without_creation_timestamp_are_ordered_by_file_then_position(tmp_path):
    (tmp_path / "b.yaml").write_text(ROUTE % "first-in-b" + "---\n" + ROUTE % "second-in-b")
    (tmp_path / "a.yaml").write_text(ROUTE % "in-a")
    sink = RecordingSink()
    ManifestsSource(tmp_path, sink).poll_once()
    stamps = {o["metadata"]["name"]: o["metadata"]["creationTimestamp"] for o in sink.objects.values()}
    assert stamps["in-a"] < stamps["first-in-b"] < stamps["second-in-b"]


def test_a_given_creation_timestamp_is_kept_and_orders_before_synthetic_ones():
    given = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "TCPRoute",
             "metadata": {"name": "old", "namespace": "m", "creationTimestamp": "2024-05-01T00:00:00Z"}}
    plain = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "TCPRoute", "metadata": {"name": "new", "namespace": "m"}}
    out = order_routes([plain, given])
    assert out[1]["metadata"]["creationTimestamp"] == "2024-05-01T00:00:00Z"
    assert out[0]["metadata"]["creationTimestamp"] > "2024-05-01T00:00:00Z"


def test_duplicate_identity_later_file_wins(tmp_path):
    (tmp_path / "a.yaml").write_text(SERVICE)
    (tmp_path / "b.yaml").write_text(SERVICE.replace("10.96.0.10", "10.96.0.11"))
    sink = RecordingSink()
    source = ManifestsSource(tmp_path, sink)
    source.poll_once()
    (svc,) = sink.objects.values()
    assert svc["spec"]["clusterIP"] == "10.96.0.11"
    # the earlier file changes: the later one still wins
    write(tmp_path / "a.yaml", SERVICE.replace("10.96.0.10", "10.96.0.12"))
    source.poll_once()
    assert sink.get("Service", "echo")["spec"]["clusterIP"] == "10.96.0.11"
    # the later file drops it: the earlier file's object is in force again (read anew)
    write(tmp_path / "b.yaml", ROUTE % "r1")
    source.poll_once()
    assert sink.get("Service", "echo")["spec"]["clusterIP"] == "10.96.0.12"
    assert sink.names() == [("HTTPRoute", "r1"), ("Service", "echo")]
    # the later file takes it again, then goes away entirely
    write(tmp_path / "b.yaml", SERVICE.replace("10.96.0.10", "10.96.0.13"))
    source.poll_once()
    assert sink.get("Service", "echo")["spec"]["clusterIP"] == "10.96.0.13"
    (tmp_path / "b.yaml").unlink()
    source.poll_once()
    assert sink.get("Service", "echo")["spec"]["clusterIP"] == "10.96.0.12"
    # and the last holder goes: deleted
    (tmp_path / "a.yaml").unlink()
    source.poll_once()
    assert sink.names() == []


def test_duplicate_inside_one_file_the_later_document_wins(tmp_path):
    (tmp_path / "a.yaml").write_text(SERVICE + "---\n" + SERVICE.replace("10.96.0.10", "10.96.0.11"))
    sink = RecordingSink()
    ManifestsSource(tmp_path, sink).poll_once()
    assert sink.get("Service", "echo")["spec"]["clusterIP"] == "10.96.0.11"


def test_an_edit_that_removes_a_document_deletes_it_and_leaves_other_files_alone(tmp_path):
    (tmp_path / "a.yaml").write_text(SERVICE + "---\n" + ROUTE % "r1" + "---\n" + ROUTE % "r2")
    (tmp_path / "other.yaml").write_text(SERVICE.replace("echo", "other").replace("10.96.0.10", "10.96.0.20"))
    sink = RecordingSink()
    source = ManifestsSource(tmp_path, sink)
    source.poll_once()
    assert sink.names() == [("HTTPRoute", "r1"), ("HTTPRoute", "r2"), ("Service", "echo"), ("Service", "other")]
    write(tmp_path / "a.yaml", SERVICE + "---\n" + ROUTE % "r2")
    source.poll_once()
    assert sink.names() == [("HTTPRoute", "r2"), ("Service", "echo"), ("Service", "other")]
    upserted, deleted = sink.steps[-1]
    assert deleted == [("HTTPRoute", "r1")]
    assert ("Service", "other") not in upserted, "an unchanged file is not read again"


def test_routes_are_renumbered_when_a_route_is_added_to_an_earlier_file(tmp_path):
    (tmp_path / "a.yaml").write_text(ROUTE % "in-a")
    (tmp_path / "b.yaml").write_text(ROUTE % "in-b")
    sink = RecordingSink()
    source = ManifestsSource(tmp_path, sink)
    source.poll_once()
    write(tmp_path / "a.yaml", ROUTE % "in-a" + "---\n" + ROUTE % "second-in-a")
    source.poll_once()
    stamps = {o["metadata"]["name"]: o["metadata"]["creationTimestamp"] for o in sink.objects.values()}
    assert stamps["in-a"] < stamps["second-in-a"] < stamps["in-b"]


def test_a_resource_version_in_a_manifest_is_dropped(tmp_path):
    (tmp_path / "svc.yaml").write_text(SERVICE.replace("{name: echo, namespace: mesh}",
                                                       "{name: echo, namespace: mesh, resourceVersion: '42'}"))
    sink = RecordingSink()
    ManifestsSource(tmp_path, sink).poll_once()
    assert "resourceVersion" not in sink.get("Service", "echo")["metadata"]


def write(path, text):
    """Rewrite a file so that the poll sees it changed, whatever the filesystem's time grain."""
    path.write_text(text)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))


def test_split_keeps_content_on_the_marker_line_and_ignores_empty_documents():
    docs = split_yaml_documents("---\n--- {a: 1}\n...\n# c\n---\nb: 2\n")
    assert [text for _, text in docs if text.strip() and not text.strip().startswith("#")] == ["{a: 1}\n", "b: 2\n"]


#: A generous deadline for the polling thread to react (a loaded CI machine is slow at times); the
#: one-second promise itself is the poll interval's (test_the_default_poll_interval_...).
REACT = 10.0


def test_the_default_poll_interval_keeps_the_one_second_promise():
    from agent.runtime.settings import Settings

    # A change is read by the next poll_once (the tests around), which runs this often.
    assert Settings.manifests_poll_interval + Settings.min_sync_interval <= 0.5


def test_change_is_seen_by_the_running_source_and_synced_once(tmp_path):
    (tmp_path / "svc.yaml").write_text(SERVICE)
    sink = RecordingSink()
    source = ManifestsSource(tmp_path, sink, poll_interval=0.2)
    source.start()
    try:
        assert sink.synced_event.wait(REACT)
        sink.changed.clear()
        assert sink.synced_sources == [SOURCE]
        (tmp_path / "route.yaml").write_text(ROUTE % "r1")
        assert sink.changed.wait(REACT), "a new file was not read"
        assert ("HTTPRoute", "r1") in sink.names()
        sink.changed.clear()
        (tmp_path / "route.yaml").unlink()
        assert sink.changed.wait(REACT), "a removed file was not noticed"
        assert sink.names() == [("Service", "echo")]
        assert sink.steps[-1] == ([], [("HTTPRoute", "r1")])
        assert sink.synced_sources == [SOURCE]
    finally:
        source.stop()


def test_unchanged_directory_is_not_resent(tmp_path):
    (tmp_path / "svc.yaml").write_text(SERVICE)
    sink = RecordingSink()
    source = ManifestsSource(tmp_path, sink)
    source.poll_once()
    source.poll_once()
    assert len(sink.steps) == 1
    # Same size, new content: the signature includes mtime, so it is read again.
    path = tmp_path / "svc.yaml"
    path.write_text(SERVICE.replace("10.96.0.10", "10.96.0.99"))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    source.poll_once()
    assert len(sink.steps) == 2 and sink.get("Service", "echo")["spec"]["clusterIP"] == "10.96.0.99"


def test_missing_directory_keeps_the_last_list(tmp_path):
    directory = tmp_path / "m"
    directory.mkdir()
    (directory / "svc.yaml").write_text(SERVICE)
    sink = RecordingSink()
    source = ManifestsSource(directory, sink)
    assert source.poll_once()
    (directory / "svc.yaml").unlink()
    directory.rmdir()
    assert source.poll_once()
    assert len(sink.steps) == 1 and sink.names() == [("Service", "echo")]


@pytest.mark.parametrize("text", ["", "# nothing\n", "---\n---\n"])
def test_empty_files_give_no_objects_and_no_errors(text):
    contents = parse_manifest("e.yaml", text)
    assert contents.objects == () and contents.bad == ()


def test_a_file_caught_mid_write_while_read_again_is_not_half_applied(tmp_path, monkeypatch):
    (tmp_path / "a.yaml").write_text(SERVICE)
    (tmp_path / "b.yaml").write_text(SERVICE.replace("10.96.0.10", "10.96.0.11"))
    sink = RecordingSink()
    source = ManifestsSource(tmp_path, sink)
    source.poll_once()
    write(tmp_path / "b.yaml", ROUTE % "r1")  # b drops echo: a's echo must be read again
    real_read = source._read
    monkeypatch.setattr(source, "_read", lambda name, sig: None if name == "a.yaml" else real_read(name, sig))
    assert source.poll_once()
    assert len(sink.steps) == 1, "nothing of the change applied while a.yaml could not be read whole"
    monkeypatch.setattr(source, "_read", real_read)
    source.poll_once()
    assert sink.get("Service", "echo")["spec"]["clusterIP"] == "10.96.0.10"
    assert sink.names() == [("HTTPRoute", "r1"), ("Service", "echo")]


# --- one bad file never stops the rest (issue 13) --------------------------------------------------


def _deep_yaml(path):
    path.write_text("a: " + "{a: " * 5000 + "b" + "}" * 5000 + "\n")


def _deep_json(path):
    path.write_text("[" * 100_000 + "]" * 100_000)


def _self_symlink(path):
    os.symlink(path.name, path)


def _directory_loop(path):
    path.parent.mkdir()
    os.symlink("..", path)


def _fifo(path):
    os.mkfifo(path)


def _over_the_cap(path, monkeypatch):
    monkeypatch.setattr(manifests, "MAX_FILE_BYTES", 1000)
    path.write_text(SERVICE.replace("echo", "big") + "#" * 2000 + "\n")


def _not_utf8(path):
    path.write_bytes(b"kind: Service\nmetadata: {name: \xff\xfe}\n")


def _bad_timestamp(path):
    path.write_text("a: 2024-13-45\n")


def _alias_bomb(path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    path.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: bomb}\ndata:\n"
                    + "".join("  " + line + "\n" for line in lines))


def _unreadable(path, monkeypatch):
    path.write_text(SERVICE.replace("echo", "secret"))
    real = manifests.read_capped

    def refuse(p, cap):
        if Path(p).name == path.name:
            raise PermissionError(13, "Permission denied")
        return real(p, cap)
    monkeypatch.setattr(manifests, "read_capped", refuse)


BAD_FILES = {
    # name: (how to make it, its name in the directory, a word the reason must contain)
    "deep-yaml": (_deep_yaml, "deep.yaml", "nested"),
    "deep-json": (_deep_json, "deep.json", "nested"),
    "symlink-to-itself": (_self_symlink, "self.yaml", "symbolic links"),
    "directory-loop": (_directory_loop, "sub/loop", "already read"),
    "fifo": (_fifo, "pipe.yaml", "FIFO"),
    "over-the-cap": (_over_the_cap, "big.yaml", "cap"),
    "not-utf8": (_not_utf8, "latin.yaml", "UTF-8"),
    "bad-timestamp": (_bad_timestamp, "date.yaml", "month"),
    "alias-bomb": (_alias_bomb, "bomb.yaml", "values"),
    "permission": (_unreadable, "secret.yaml", "Permission denied"),
}


def _bad_reports(caplog):
    return [r for r in caplog.records
            if getattr(r, "meshlet_event", "") in ("manifests.bad_file", "manifests.bad_document", "manifests.error")]


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_file_is_skipped_alone_reported_once_and_counted(tmp_path, caplog, monkeypatch, case):
    make, name, reason = BAD_FILES[case]
    (tmp_path / "svc.yaml").write_text(SERVICE)
    bad = tmp_path / name
    if "monkeypatch" in make.__code__.co_varnames:
        make(bad, monkeypatch)
    else:
        make(bad)
    sink, counted = RecordingSink(), []
    source = ManifestsSource(tmp_path, sink, on_bad_files=counted.append)
    with caplog.at_level(logging.WARNING):
        assert source.poll_once()
        assert sink.names() == [("Service", "echo")]
        (report,) = _bad_reports(caplog)
        assert report.meshlet_event != "manifests.error"
        assert report.meshlet_fields["file"] == name
        assert reason in report.meshlet_fields["error"]
        assert source.bad_files == 1 and counted == [1]

        # The rest of the directory keeps applying; the bad file is not reported again.
        (tmp_path / "other.yaml").write_text(SERVICE.replace("echo", "other").replace("10.96.0.10", "10.96.0.20"))
        for _ in range(3):
            source.poll_once()
        assert sink.names() == [("Service", "echo"), ("Service", "other")]
        assert len(_bad_reports(caplog)) == 1
        assert counted[-1] == 1

        # Removed: it is no longer counted.
        bad.unlink()
        source.poll_once()
        assert source.bad_files == 0 and counted[-1] == 0
        assert len(_bad_reports(caplog)) == 1


def test_a_bad_file_is_reported_again_when_it_changes(tmp_path, caplog):
    (tmp_path / "svc.yaml").write_text(SERVICE)
    _deep_yaml(tmp_path / "deep.yaml")
    os.symlink("self.yaml", tmp_path / "self.yaml")
    source = ManifestsSource(tmp_path, RecordingSink())
    with caplog.at_level(logging.WARNING):
        source.poll_once()
        assert sorted(r.meshlet_fields["file"] for r in _bad_reports(caplog)) == ["deep.yaml", "self.yaml"]
        caplog.clear()
        source.poll_once()
        assert _bad_reports(caplog) == []
        write(tmp_path / "deep.yaml", "[" * 5000 + "]" * 5000 + "\n")
        (tmp_path / "self.yaml").unlink()
        os.symlink("other-loop.yaml", tmp_path / "self.yaml")
        os.symlink("self.yaml", tmp_path / "other-loop.yaml")
        source.poll_once()
        assert sorted(r.meshlet_fields["file"] for r in _bad_reports(caplog)) == [
            "deep.yaml", "other-loop.yaml", "self.yaml"]
        assert source.bad_files == 3


def test_a_good_file_that_turns_bad_loses_its_objects_and_recovers(tmp_path):
    (tmp_path / "svc.yaml").write_text(SERVICE)
    (tmp_path / "other.yaml").write_text(SERVICE.replace("echo", "other").replace("10.96.0.10", "10.96.0.20"))
    sink = RecordingSink()
    source = ManifestsSource(tmp_path, sink)
    source.poll_once()
    write(tmp_path / "other.yaml", "[" * 5000 + "]" * 5000 + "\n")
    source.poll_once()
    assert sink.names() == [("Service", "echo")] and source.bad_files == 1
    write(tmp_path / "other.yaml", SERVICE.replace("echo", "other").replace("10.96.0.10", "10.96.0.20"))
    source.poll_once()
    assert sink.names() == [("Service", "echo"), ("Service", "other")] and source.bad_files == 0


def test_a_file_that_vanishes_while_read_is_left_to_the_next_poll_and_the_rest_applies(tmp_path, monkeypatch):
    (tmp_path / "svc.yaml").write_text(SERVICE)
    (tmp_path / "gone.yaml").write_text(ROUTE % "r1")
    real = manifests.read_capped

    def vanish(path, cap):
        if Path(path).name == "gone.yaml":
            os.unlink(path)
            raise FileNotFoundError(2, "No such file or directory")
        return real(path, cap)
    monkeypatch.setattr(manifests, "read_capped", vanish)
    sink = RecordingSink()
    source = ManifestsSource(tmp_path, sink)
    assert source.poll_once()
    assert sink.names() == [("Service", "echo")]
    assert source.poll_once() and source.bad_files == 0


def test_a_file_caught_mid_write_keeps_its_last_state_while_other_files_apply(tmp_path, monkeypatch):
    (tmp_path / "svc.yaml").write_text(SERVICE)
    (tmp_path / "routes.yaml").write_text(ROUTE % "r1")
    sink = RecordingSink()
    source = ManifestsSource(tmp_path, sink)
    source.poll_once()
    write(tmp_path / "routes.yaml", ROUTE % "r2")
    (tmp_path / "other.yaml").write_text(SERVICE.replace("echo", "other").replace("10.96.0.10", "10.96.0.20"))
    real = source._read
    monkeypatch.setattr(source, "_read", lambda name, sig: None if name == "routes.yaml" else real(name, sig))
    source.poll_once()
    assert sink.names() == [("HTTPRoute", "r1"), ("Service", "echo"), ("Service", "other")]
    monkeypatch.setattr(source, "_read", real)
    source.poll_once()
    assert sink.names() == [("HTTPRoute", "r2"), ("Service", "echo"), ("Service", "other")]


def test_an_unexpected_poll_error_is_logged_once_while_it_lasts(tmp_path, caplog, monkeypatch):
    (tmp_path / "svc.yaml").write_text(SERVICE)
    sink = RecordingSink()
    source = ManifestsSource(tmp_path, sink, poll_interval=0.01)
    polls = threading.Semaphore(0)

    def broken():
        polls.release()
        raise RuntimeError("boom")
    monkeypatch.setattr(source, "poll_once", broken)
    with caplog.at_level(logging.ERROR):
        source.start()
        try:
            for _ in range(5):
                assert polls.acquire(timeout=30)
        finally:
            source.stop()
    assert len([r for r in caplog.records if getattr(r, "meshlet_event", "") == "manifests.error"]) == 1


def test_the_bad_files_gauge_follows_the_directory(tmp_path):
    from prometheus_client import generate_latest

    from agent.runtime.metrics import Metrics

    metrics = Metrics()
    (tmp_path / "svc.yaml").write_text(SERVICE)
    os.symlink("self.yaml", tmp_path / "self.yaml")
    source = ManifestsSource(tmp_path, RecordingSink(), on_bad_files=metrics.manifests_bad_files.set)
    source.poll_once()
    assert b"meshlet_manifests_bad_files 1.0" in generate_latest(metrics.registry)
    (tmp_path / "self.yaml").unlink()
    source.poll_once()
    assert b"meshlet_manifests_bad_files 0.0" in generate_latest(metrics.registry)


def test_an_unreadable_directory_keeps_the_last_list_instead_of_emptying_it(tmp_path, monkeypatch):
    (tmp_path / "svc.yaml").write_text(SERVICE)
    sink = RecordingSink()
    source = ManifestsSource(tmp_path, sink)
    assert source.poll_once()
    real = os.listdir

    def failing(path):
        if Path(path) == tmp_path:
            raise OSError(5, "Input/output error")
        return real(path)
    monkeypatch.setattr(manifests.os, "listdir", failing)
    with pytest.raises(OSError):
        source.poll_once()  # _run reports it once and polls again
    assert sink.names() == [("Service", "echo")] and len(sink.steps) == 1
