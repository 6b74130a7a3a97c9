"""The kernel-feature decisions, from given probe results (no kernel): what is required, what
turns off, the -D flags and hooks that follow, the start-up report and its metric.

The probe itself runs against the real kernel in tests/kernel/datapath/test_kernel_features.py.
"""

from pathlib import Path

import pytest

from agent.datapath import features, loader, uapi
from agent.datapath.layout import MapSizes
from agent.errors import UserError
from agent.runtime.metrics import Metrics

REPO = Path(__file__).resolve().parents[3]
EVERYTHING = {name: True for name in features.NAMES}


def without(*names: str) -> dict[str, bool]:
    return {**EVERYTHING, **{name: False for name in names}}


def test_a_kernel_with_everything_loads_every_hook_with_set_retval():
    support = features.decide(EVERYTHING, "6.18.0")
    assert support.hooks == tuple(uapi.HOOKS)
    assert support.defines == ("HAVE_SET_RETVAL", "HAVE_RINGBUF")
    assert support.disabled == ()
    assert support.log_fields() == {"kernel": "6.18.0", "enabled": ",".join(features.NAMES), "disabled": "-",
                                    "trace_channel": "ringbuf"}
    assert "-DHAVE_SET_RETVAL=1" in loader.cflags("/sys/fs/bpf/x", 0, MapSizes(), support)


def test_without_set_retval_rejections_become_eperm_and_the_report_says_so():
    support = features.decide(without("set_retval"), "5.15.0")
    assert support.defines == ("HAVE_RINGBUF",)
    assert not any("HAVE_SET_RETVAL" in flag for flag in loader.cflags("/sys/fs/bpf/x", 0, MapSizes(), support))
    assert support.hooks == tuple(uapi.HOOKS), "every hook still loads"
    fields = support.log_fields()
    assert fields["disabled"] == "set_retval"
    assert "set_retval" not in fields["enabled"].split(",")
    assert "EPERM instead of ECONNREFUSED" in fields["effects"] and "EHOSTUNREACH" in fields["effects"]
    assert fields["hint"] == "Linux >= 5.18 has every feature"


def test_without_getpeername_those_two_hooks_are_neither_loaded_nor_attached():
    support = features.decide(without("getpeername4", "getpeername6", "set_retval", "ringbuf", "sockops"), "5.7.0")
    assert support.hooks == ("connect4", "connect6", "sendmsg4", "sendmsg6", "recvmsg4", "recvmsg6")
    fields = support.log_fields()
    assert fields["disabled"] == "getpeername4,getpeername6,sockops,set_retval,ringbuf"
    assert "getpeername() on a translated socket shows the endpoint" in fields["effects"]


def test_without_ring_buffers_trace_falls_back_to_perf_buffers_and_the_report_says_so():
    support = features.decide(without("ringbuf"), "5.7.0")
    assert support.trace_channel == "perf"
    assert "HAVE_RINGBUF" not in support.defines and "TRACE_PERF_BUFFER" in support.defines
    fields = support.log_fields()
    assert fields["trace_channel"] == "perf" and "ringbuf: `meshlet trace` reads per-CPU perf buffers" in fields["effects"]
    everything = features.decide(EVERYTHING)
    assert everything.trace_channel == "ringbuf", "the ring buffer stays the default"
    assert "HAVE_RINGBUF" in everything.defines and "TRACE_PERF_BUFFER" not in everything.defines


def test_without_either_channel_trace_is_unavailable_and_the_report_says_so():
    support = features.decide(without("ringbuf", "perf_output"), "5.7.0")
    assert support.trace_channel is None
    assert not {"HAVE_RINGBUF", "TRACE_PERF_BUFFER"} & set(support.defines)
    fields = support.log_fields()
    assert fields["trace_channel"] == "-" and "`meshlet trace` has no perf-buffer fallback" in fields["effects"]


def test_without_sock_destroy_the_agent_starts_and_says_what_is_lost():
    support = features.decide(without("sock_destroy"), "6.1.0")
    fields = support.log_fields()
    assert fields["disabled"] == "sock_destroy"
    assert "connected UDP sockets" in fields["effects"] and "A16" in fields["effects"]


@pytest.mark.parametrize("missing", [name for name in features.NAMES
                                     if name not in ("getpeername4", "getpeername6", "set_retval", "ringbuf",
                                                     "perf_output", "sockops", "sock_destroy")])
def test_every_other_feature_is_required(missing):
    with pytest.raises(UserError, match=f"Linux >= {features.MINIMUM_KERNEL}"):
        features.decide(without(missing))


def test_without_sockops_passive_health_is_off_and_the_report_says_so():
    support = features.decide(without("sockops"), "5.9.0")
    assert "sockops" not in support.hooks
    assert support.hooks == tuple(h for h in loader.HOOKS if h != "sockops")
    fields = support.log_fields()
    assert fields["disabled"] == "sockops"
    assert "passive health is off" in fields["effects"]


def test_all_missing_required_features_are_named_in_one_sentence_before_anything_else():
    with pytest.raises(UserError) as raised:
        features.decide(without("recvmsg4", "recvmsg6", "netns_cookie", "cgroup_links", "set_retval"), "5.4.0")
    text = str(raised.value)
    assert text.startswith("Linux 5.4.0 lacks what meshlet's socket programs need: ")
    for named in ("cgroup recvmsg4 hook (Linux 5.2)", "cgroup recvmsg6 hook (Linux 5.2)",
                  "bpf_get_netns_cookie", "bpf links on cgroups"):
        assert named in text
    assert "bpf_set_retval" not in text, "optional features are not in the refusal"
    assert text.endswith("hint: run meshlet on Linux >= 5.7 (>= 5.18 for every feature)")
    assert "\n" not in text


def test_a_name_left_out_counts_as_missing_and_an_unknown_name_is_a_bug():
    partial = dict(EVERYTHING)
    del partial["sk_storage"]
    with pytest.raises(UserError, match="socket-local storage"):
        features.decide(partial)
    with pytest.raises(ValueError, match="set_retvall"):
        features.decide({**EVERYTHING, "set_retvall": False})


def test_the_floors_follow_from_the_table_and_the_docs_state_them():
    assert (features.MINIMUM_KERNEL, features.FULL_KERNEL) == ("5.7", "5.18")
    assert {f.name for f in features.FEATURES if f.name in uapi.HOOKS} == set(uapi.HOOKS)
    for doc in ("README.md", "daemonset/README.md"):
        text = (REPO / doc).read_text()
        assert f"Linux {features.MINIMUM_KERNEL}" in text and f"Linux {features.FULL_KERNEL}" in text, doc


def test_the_metric_has_one_series_per_feature_at_1_or_0():
    metrics = Metrics()
    metrics.record_kernel_features(features.decide(without("set_retval")).present)
    sample = metrics.registry.get_sample_value
    assert sample("meshlet_kernel_feature", {"feature": "set_retval"}) == 0
    assert sample("meshlet_kernel_feature", {"feature": "cgroup_links"}) == 1
    series = [s for family in metrics.registry.collect() if family.name == "meshlet_kernel_feature"
              for s in family.samples]
    assert sorted(s.labels["feature"] for s in series) == sorted(features.NAMES)
