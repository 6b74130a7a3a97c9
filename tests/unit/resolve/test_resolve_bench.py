"""bench/resolve_cost.py runs and reports what it claims (a small size, so it stays fast)."""

import json

from bench import resolve_cost


def test_resolve_cost_prints_one_json_line_per_size(capsys):
    assert resolve_cost.main(["--sizes", "200,300", "--changes", "5"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["services"] for line in lines] == [200, 300]
    for line in lines:
        assert line["frontends"] == line["services"]
        assert line["slice_change_ms"] > 0 and line["route_change_ms"] > 0 and line["full_resolve_s"] > 0
