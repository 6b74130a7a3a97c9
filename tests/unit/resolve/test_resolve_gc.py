"""The collector pause around bulk work (agent.gcpause): the process's gc switch is always
restored, also when the work fails, and a collector someone else disabled stays disabled; memory
freed after a full sync goes back to the kernel."""

import gc

import pytest

from agent import gcpause
from agent.gcpause import gc_paused
from agent.resolve import Resolver


@pytest.fixture
def gc_enabled():
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_pause_restores_the_collector_also_on_error(gc_enabled):
    with pytest.raises(RuntimeError):
        with gc_paused():
            assert not gc.isenabled()
            with gc_paused():  # nested: the inner exit must not turn it back on early
                pass
            assert not gc.isenabled()
            raise RuntimeError("boom")
    assert gc.isenabled()


def test_pause_leaves_a_disabled_collector_disabled(gc_enabled):
    gc.disable()
    with gc_paused():
        pass
    assert not gc.isenabled()


def test_the_bulk_steps_run_with_the_collector_paused_and_restore_it(gc_enabled, monkeypatch):
    # Each bulk step is observed from inside (a function it calls records the collector's
    # switch), so removing a pause fails this test, and the switch is back on after each step.
    import agent.datapath.plan as plan_module
    import agent.resolve as resolve_module
    from agent.datapath.reconcile import DictMap, Reconciler, dict_maps
    from agent.datapath import layout as L

    seen: dict[str, list[bool]] = {}

    def spy(step, function):
        def recording(*args, **kwargs):
            seen.setdefault(step, []).append(gc.isenabled())
            return function(*args, **kwargs)
        return recording

    resolver = Resolver("node-a")
    monkeypatch.setattr(resolver, "upsert", spy("upsert_many", resolver.upsert))
    monkeypatch.setattr(resolve_module, "service_frontends", spy("commit", resolve_module.service_frontends))
    monkeypatch.setattr(plan_module, "plan_clients", spy("plan", plan_module.plan_clients))
    resolver.upsert_many([
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
         "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}},
        {"apiVersion": "v1", "kind": "Bogus"},
    ])
    assert gc.isenabled()
    delta = resolver.commit()
    assert gc.isenabled()
    assert delta.frontends  # the Service was read: the pause did not skip any work
    planned = plan_module.plan(resolver.state, {})
    assert gc.isenabled()
    writer = Reconciler(dict_maps(100))
    monkeypatch.setattr(writer, "_write", spy("reconcile full", writer._write))
    writer.full(planned)
    assert gc.isenabled()
    assert seen == {"upsert_many": [False, False], "commit": [False], "plan": [False], "reconcile full": [False]}


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_release_free_heap_gives_freed_memory_back_to_the_kernel():
    # 64 MiB in 2 KiB buffers (above pymalloc's limit: glibc's heap), then all but one in 64
    # freed: the survivors keep glibc from shrinking the heap on its own, as a long-lived
    # agent's records would.
    blocks = [bytearray(2048) for _ in range(32768)]
    survivors = blocks[::64]
    del blocks
    before = _rss_kib()
    assert gcpause.release_free_heap()
    assert before - _rss_kib() > 32 * 1024, "at least half of the freed 62 MiB went back"
    assert len(survivors) == 512
