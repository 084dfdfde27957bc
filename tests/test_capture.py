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


def test_pool_bytes_sums_the_pools_segments_on_the_device(monkeypatch):
    """pool_bytes counts only the segments of the asked pool on the asked device (what a capture grew), not the
    allocator's other memory; an older torch's snapshot (no mempool_id argument) is filtered the same way."""
    segs = [{"device": 0, "segment_pool_id": (0, 7), "total_size": 2 << 20},
            {"device": 0, "segment_pool_id": (0, 7), "total_size": 1 << 20},
            {"device": 0, "segment_pool_id": (0, 0), "total_size": 64 << 20},  # the ordinary cache
            {"device": 1, "segment_pool_id": (0, 7), "total_size": 8 << 20}]
    asked = []

    def snapshot(mempool_id=None, include_traces=True):
        asked.append(mempool_id)
        return segs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_snapshot", snapshot)
    assert cap.pool_bytes((0, 7), torch.device("cuda", 0)) == 3 << 20
    assert cap.pool_bytes((0, 7), torch.device("cuda", 1)) == 8 << 20
    assert cap.pool_bytes((0, 9), torch.device("cuda", 0)) == 0
    assert asked == [(0, 7), (0, 7), (0, 9)]

    def old_snapshot():
        return segs

    monkeypatch.setattr(torch.cuda, "memory_snapshot", old_snapshot)
    assert cap.pool_bytes((0, 7), torch.device("cuda", 0)) == 3 << 20
    assert cap.pool_bytes(None, torch.device("cuda", 0)) == 0
