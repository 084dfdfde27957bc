"""decode/capture.py's BucketGraphs tally, on CPU (graphed=False; `capture` itself needs CUDA, so it is replaced)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from tiered.decode import capture as cap


def test_bucket_graphs_count_captures_and_refuse_failed_buckets(monkeypatch):
    """A capture that works adds its seconds and memory and is handed back; one that fails drops its bucket,
    names why in `failed`, and the stats list only buckets holding a graph."""
    results = iter([cap.Captured("graph", "out", 0.25, 1024), "RuntimeError: not capturable"])
    calls = []

    def fake(body, device, pool, *, warmups):
        calls.append(warmups)
        return next(results)

    monkeypatch.setattr(cap, "capture", fake)
    g = cap.BucketGraphs(torch.device("cpu"), graphed=False)
    assert g.pool is None
    g.buckets[8] = SimpleNamespace(graph=None)
    g.buckets[16] = SimpleNamespace(graph=None)
    got = g._capture(8, lambda: None, warmups=2)
    g.buckets[8].graph = got.graph
    assert got.out == "out" and g.capture_s == 0.25 and g.graph_mem_bytes == 1024
    assert g._capture(16, lambda: None, warmups=1) is None
    assert 16 not in g.buckets and g.failed == {16: "RuntimeError: not capturable"} and calls == [2, 1]
    assert g.stats() == {"buckets": [8], "replays": 0, "capture_s": 0.25, "graph_mem_bytes": 1024,
                         "failed": {16: "RuntimeError: not capturable"}}
