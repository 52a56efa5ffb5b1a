"""`mio bench serve` at small sizes: it runs end to end and reports its figures (never checked
against targets: tests do not judge timings). Its concurrent and one-at-a-time runs did the same
work, or it would have raised."""

from __future__ import annotations

import pytest

from mio.bench.serve import bench_serve


@pytest.mark.slow
def test_bench_serve_reports_its_figures():
    out = bench_serve(clients=3, new_tokens=4, short_tokens=2, long_tokens=6, long_requests=2, repeats=1)
    for key in ("throughput_ratio", "p50_latency_s", "p99_latency_s", "short_behind_long", "long_new_tokens"):
        assert out[key] > 0, (key, out)
    assert out["clients"] == 3 and 0 < out["new_tokens"] <= 3 * 4 and out["p50_latency_s"] <= out["p99_latency_s"]
