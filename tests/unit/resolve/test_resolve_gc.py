"""The collector pause around bulk work (agent.gcpause): the process's gc switch is always
restored, also when the work fails, and a collector someone else disabled stays disabled."""

import gc

import pytest

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


def test_resolver_bulk_steps_restore_the_collector(gc_enabled):
    resolver = Resolver("node-a")
    resolver.upsert_many([
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
         "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}},
        {"apiVersion": "v1", "kind": "Bogus"},
    ])
    assert gc.isenabled()
    delta = resolver.commit()
    assert gc.isenabled()
    assert delta.frontends  # the Service was read: the pause did not skip any work
