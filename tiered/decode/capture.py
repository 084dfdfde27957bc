"""Capturing one CUDA graph of a step body, for the bucketed graphs (batchgraph.py, graphedprefill.py).

Owns: `capture` (warm-ups on a side stream, the capture into a shared pool, what it cost), `Captured`, and
`BucketGraphs` (what both bucketed graph sets keep: their buckets, the shared pool, the buckets whose capture
failed, and the capture time, memory and replays they report).
Does not own: the bodies, their buffers, nor when to capture (the callers); graphed.py's whole decode step keeps
its own capture, which also restores the token and position its warm-ups advance.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class Captured:
    graph: torch.cuda.CUDAGraph
    out: Any  # what the captured body returned: static tensors each replay rewrites
    seconds: float
    mem_bytes: int  # growth of the graph pool's CUDA memory while capturing (pool_bytes)


def pool_bytes(pool: Any, device: torch.device) -> int:
    """Bytes of CUDA memory the graph memory pool `pool` (torch.cuda.graph_pool_handle) holds on `device` now: the
    sum of its segments in the allocator's snapshot; 0 without a pool or on a device that is not CUDA (a test's
    stand-in on CPU, also on a box that has a GPU). The graphs' own memory, where the
    growth of all reserved memory around a capture is not: the capture's torch.cuda.graph releases cached blocks
    that tensors freed since the caller's measurement left (a tiny model's decode capture measured -14 MB that way
    on an H100, session 54)."""
    dev = torch.device(device)
    if pool is None or dev.type != "cuda" or not torch.cuda.is_available():
        return 0
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    want = tuple(pool)
    try:
        segs = torch.cuda.memory_snapshot(mempool_id=pool, include_traces=False)
    except TypeError:  # an older torch: every segment (each names its pool)
        segs = torch.cuda.memory_snapshot()
    return sum(int(s["total_size"]) for s in segs
               if s.get("device", idx) == idx and tuple(s.get("segment_pool_id") or ()) == want)


def capture(body: Callable[[], Any], device: torch.device, pool: Any, *, warmups: int) -> Captured | str:
    """Run `body` `warmups` times on a side stream (Triton compiles, cuBLAS workspaces, lazy inits; each run
    must leave the state as the replay will), then capture it into `pool`. Returns the graph, or why the
    capture failed (an operation that cannot be captured: the caller runs that body eagerly from then on)."""
    t0 = time.perf_counter()
    torch.cuda.synchronize(device)
    mem0 = pool_bytes(pool, device)
    try:
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmups):
                body()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = body()
    except RuntimeError as e:
        torch.cuda.synchronize(device)
        return f"{type(e).__name__}: {e}"[:500]
    torch.cuda.synchronize(device)
    return Captured(graph, out, time.perf_counter() - t0, pool_bytes(pool, device) - mem0)


class BucketGraphs:
    """The state both bucketed graph sets share (batchgraph.BatchGraphs, graphedprefill.GraphedPrefill): buckets
    (key -> an object with a `graph` attribute), one memory pool, the buckets whose capture failed (those run
    eagerly), and the capture seconds, memory and replays their stats report."""

    def __init__(self, device: torch.device, graphed: bool) -> None:
        self.device = device
        self.graphed = bool(graphed)
        self.buckets: dict[int, Any] = {}
        self.failed: dict[int, str] = {}  # bucket -> why its capture failed (that bucket runs eagerly)
        self.pool = torch.cuda.graph_pool_handle() if self.graphed else None
        self.capture_s = 0.0
        self.graph_mem_bytes = 0  # the pool's growth summed over captures (recaptures included)
        self.replays = 0

    def _capture(self, key: int, body: Callable[[], Any], *, warmups: int) -> Captured | None:
        """`capture` of bucket `key`'s body, counted; None when it failed: the bucket is dropped and refused
        from then on (its steps run eagerly)."""
        got = capture(body, self.device, self.pool, warmups=warmups)
        if isinstance(got, str):
            self.failed[key] = got
            del self.buckets[key]
            return None
        self.capture_s += got.seconds
        self.graph_mem_bytes += got.mem_bytes
        return got

    def stats(self) -> dict:
        return {"buckets": sorted(k for k, b in self.buckets.items() if b.graph is not None), "replays": self.replays,
                "capture_s": self.capture_s, "graph_mem_bytes": self.graph_mem_bytes, "failed": dict(self.failed)}
