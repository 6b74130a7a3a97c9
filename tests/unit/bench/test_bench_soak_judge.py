"""The churn soak's judge (bench/soak.py), on made-up timelines: no root needed."""

from bench import soak


def test_a_connection_to_an_endpoint_that_was_not_usable_is_caught():
    # The judge itself, on a made-up timeline: pod b leaves at t=10; a connection to b at 10.5 is
    # inside the 1 s sync delay, one at 12 is not.
    timeline = [(0.0, frozenset({"10.0.0.1", "10.0.0.2"})), (10.0, frozenset({"10.0.0.1"}))]
    names = {"a": "10.0.0.1", "b": "10.0.0.2"}
    lines = [{"t": 5.0, "peer": "b"}, {"t": 10.5, "peer": "b"}, {"t": 12.0, "peer": "b"},
             {"t": 12.0, "peer": "a"}, {"t": 13.0, "error": "ECONNREFUSED"}]
    failed, wrong = soak.judge_connections(lines, timeline, names, sync_delay=1.0)
    assert failed == [lines[4]] and wrong == [{**lines[2], "late_s": 2.0}]


def test_growth_is_measured_from_the_first_sample_after_the_warmup():
    samples = [(0.0, 10.0, 5), (30.0, 100.0, 50), (60.0, 100.0, 50), (90.0, 104.0, 51), (120.0, 102.0, 50)]
    assert soak.growth(samples, 60.0, 1) == 0.04
    assert soak.growth(samples, 60.0, 2) == 0.02
    assert soak.growth(samples[:3], 60.0, 1) is None
