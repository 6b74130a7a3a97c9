"""`meshlet trace` without the kernel: --to parsing, the control value a filter asks for, decoding."""

import pytest

from agent.datapath import layout as L
from agent.datapath import trace as T
from agent.errors import UserError


@pytest.mark.parametrize("text,want", [
    ("10.96.0.10", T.To("10.96.0.10")),
    ("10.96.0.10:80", T.To("10.96.0.10", 80)),
    ("10.96.0.10:53/udp", T.To("10.96.0.10", 53, "UDP")),
    ("10.96.0.10/tcp", T.To("10.96.0.10", 0, "TCP")),
    ("fd00::a", T.To("fd00::a")),
    ("[fd00::a]", T.To("fd00::a")),
    ("[fd00::a]:80/tcp", T.To("fd00::a", 80, "TCP")),
])
def test_to_takes_an_address_with_optional_port_and_protocol(text, want):
    assert T.parse_to(text) == want


@pytest.mark.parametrize("text", ["web:80", "10.96.0.10:0", "10.96.0.10:80/icmp", "[fd00::a]80"])
def test_a_bad_to_is_one_sentence_with_a_hint(text):
    with pytest.raises(UserError, match="hint: write it as"):
        T.parse_to(text)


def test_the_filter_becomes_the_control_fields_the_kernel_compares():
    flt = T.Filter(("reject", "unreachable"), T.parse_to("10.96.0.10:80/tcp"), client_cgroup=42, client_level=3)
    tc = flt.control(expires_ns=123)
    assert tc.expires_ns == 123 and tc.dropped == 0
    assert tc.outcomes == (1 << 1) | (1 << 2)
    assert bytes(tc.frontend) == b"\0" * 10 + b"\xff\xff" + bytes([10, 96, 0, 10])
    assert tc.frontend_port.to_bytes(2, "little") == (80).to_bytes(2, "big"), "network order, as the hook has it"
    assert tc.proto == 6
    assert tc.flags == L.TRACE_MATCH_FRONTEND | L.TRACE_MATCH_CLIENT
    assert (tc.client_cgroup, tc.client_level) == (42, 3)
    anything = T.Filter().control(1)
    assert anything.flags == 0 and anything.proto == 0 and anything.outcomes == 0b11111


def test_a_record_decodes_with_names_from_the_names_map():
    d = L.Decision(time_ns=5_000_000_000, cgroup_id=7, netns_cookie=9, route_id=0x55, group_id=0x66, scope=0x77,
                   proto=6, kind=1, outcome=0, err=0)
    d.frontend[:] = b"\0" * 10 + b"\xff\xff" + bytes([10, 96, 0, 10])
    d.endpoint[:] = b"\0" * 10 + b"\xff\xff" + bytes([10, 244, 0, 5])
    d.frontend_port = int.from_bytes((80).to_bytes(2, "big"), "little")
    d.endpoint_port = int.from_bytes((8080).to_bytes(2, "big"), "little")
    names = {0x55: "HTTPRoute team-a/canary rule 0", 0x66: "shop/web:http/tcp/v4", 0x77: "team-a"}
    e = T.decode(bytes(d) + b"\0" * 8, names, lambda cg: f"pod-of-{cg}", clock_offset_ns=1_000_000_000)
    assert e == T.Event(time=6.0, kind="connect", client="pod-of-7", cgroup_id=7, netns_cookie=9,
                        frontend="10.96.0.10:80", protocol="TCP", scope="team-a",
                        route="HTTPRoute team-a/canary rule 0", backend="shop/web:http/tcp/v4",
                        endpoint="10.244.0.5:8080", verdict="forward", errno="")
    d.outcome, d.err, d.route_id, d.scope = 1, 111, 0, 0
    rejected = T.decode(bytes(d), {}, str, 0)
    assert (rejected.verdict, rejected.errno, rejected.route, rejected.scope, rejected.backend) == (
        "reject", "ECONNREFUSED", "", "", "0x0000000000000066")


def test_pod_names_are_the_tagged_entries_of_the_names_map():
    assert T.pod_names({0x1234 | L.POD_NAME_TAG: "default/client", 0x1234: "shop/web:http/tcp/v4"}) == {
        0x1234: "default/client"}


def test_the_streamed_table_widens_a_column_for_good_when_a_cell_needs_it():
    table = T.TableWriter((4, 4))
    assert table.row(("A", "B")) == "A     B"
    assert table.row(("longer", "B")) == "longer  B"
    assert table.row(("A", "B")) == "A       B", "later rows keep the wider column"


def test_a_client_is_named_by_the_nearest_known_pod_above_its_cgroup(tmp_path):
    pod_dir = tmp_path / "kubepods.slice" / "kubepods-besteffort.slice" / "kubepods-besteffort-poda_b.slice"
    container = pod_dir / "cri-containerd-1.scope"
    container.mkdir(parents=True)
    node_task = tmp_path / "system.slice"
    node_task.mkdir()
    known: dict[int, str] = {}
    asked_fresh = []

    def pods(fresh: bool):
        asked_fresh.append(fresh)
        return known

    namer = T.ClientNamer(str(tmp_path), pods)
    cgroup = container.stat().st_ino
    assert namer(cgroup) == "pod a-b", "not named yet: the kubelet's cgroup name still gives the uid"
    assert asked_fresh == [False, True], "an unknown pod makes the names map be read again"
    known[pod_dir.stat().st_ino] = "shop/web-1"
    assert namer(cgroup) == "shop/web-1"
    assert namer(node_task.stat().st_ino) == "/system.slice"


def test_without_an_event_channel_pinned_the_trace_says_why_in_one_sentence(tmp_path):
    from agent.datapath import loader

    with pytest.raises(UserError, match="no meshlet maps pinned"):
        T.Control(str(tmp_path))
    maps = tmp_path / f"v{L.LAYOUT_VERSION}" / "maps"
    maps.mkdir(parents=True)
    (maps / "frontends").write_text("")  # the agent's maps are there, the trace maps are not
    assert loader.map_pin(str(tmp_path), "frontends") == str(maps / "frontends")
    with pytest.raises(UserError, match=r"neither BPF ring buffers \(Linux >= 5.8\) nor perf_event_output.*hint:"):
        T.open_channel(str(tmp_path))


def sample(raw: bytes) -> bytes:
    """A PERF_RECORD_SAMPLE as the kernel writes it: header, u32 size, the raw data padded to 8."""
    body = len(raw).to_bytes(4, "little") + raw
    body += b"\0" * (-(8 + len(body)) % 8)
    return T._PERF_HEADER.pack(T.PERF_RECORD_SAMPLE, 0, 8 + len(body)) + body


def lost(count: int) -> bytes:
    return T._PERF_HEADER.pack(T.PERF_RECORD_LOST, 0, 24) + (7).to_bytes(8, "little") + count.to_bytes(8, "little")


def test_perf_records_gives_samples_and_lost_counts_and_steps_over_other_records():
    other = T._PERF_HEADER.pack(14, 0, 16) + b"x" * 8  # a type we do not read
    data = bytearray(4096)
    stream = sample(b"first") + lost(5) + other + sample(b"second!")
    data[: len(stream)] = stream
    samples, lost_count, tail = T.perf_records(data, 0, len(stream))
    assert samples == [b"first", b"second!"] and lost_count == 5 and tail == len(stream)
    assert T.perf_records(data, tail, tail) == ([], 0, tail), "nothing new: nothing read"


def test_a_perf_record_that_wraps_around_the_end_of_the_buffer_reads_as_one():
    data = bytearray(64)
    record = sample(bytes(range(30)))  # 48 bytes
    start = 200 * 64 + 40  # positions only grow; the buffer is read modulo its size
    for i, byte in enumerate(record):
        data[(start + i) % 64] = byte
    assert T.perf_records(data, start, start + len(record)) == ([bytes(range(30))], 0, start + len(record))


def test_online_cpus_reads_the_kernel_s_cpu_list():
    assert T.online_cpus("0-3,6,8-9\n") == [0, 1, 2, 3, 6, 8, 9]
    assert T.online_cpus("0") == [0]


def test_a_decision_s_time_is_read_where_the_kernel_writes_it():
    d = L.Decision(time_ns=123456789, cgroup_id=7)
    assert T.decision_time(bytes(d)) == 123456789
