"""Offline replay of a routing trace through a model of the tiers: hit rates, bytes, predicted tok/s, Belady.

Owns: `TierModel` (slot counts, policy, prefetch depth/budget, bandwidths, compute time per layer),
`simulate` (the replay, with the same Policy classes as the cache and the same Predictor/Prefetcher
choice as the engine) and `belady_hit_rate` (the demand-paging ceiling at the same slot count).
Does not own: policies (store/policy.py, prefetch.PredictedEviction), predictors (predictors.py).

One step = one layer of one token, in decode order (token-major, layer-minor). At step (t, l):
  1. the predictor observes layer l's routing (before its experts run: the lead-time rule);
  2. demand: layer l's K experts are looked up; misses are loaded, evicting by the policy with the
     step's own experts pinned; a device miss is served by the RAM tier or, failing that, the disk;
  3. prefetch (if a predictor and depth > 0): the top `prefetch_budget` candidates of layers
     l+1 .. l+depth that are not resident are loaded, pinning this step's experts and the candidates.
Time per step, serial model (the default, `overlap=False`): max(compute, prefetch bytes / h2d) + demand bytes / h2d
+ disk bytes / disk bandwidth + host seconds per device miss and per RAM-tier miss: prefetches overlap the layer's
compute, demand loads stall it.
Pipelined model (`overlap=True`, the expert cache as it runs): the step's RAM-tier misses are read concurrently
from the step's start, sharing the disk bandwidth (the j-th lands at (j + 1) * block / disk); the host walks the
step's misses in the cache's order (those in RAM first, then those read from disk), waiting for a block's read,
then spending `host_s_per_miss` (+ `host_s_per_ram_miss` for a RAM-tier miss: registration, the rest of its
bookkeeping) before its copy is queued; copies cross the link one after another at h2d, each starting when both
it is issued and the previous copy is done. The step takes the last copy's end, then the compute (prefetch copies
overlap it as above). `step_terms` gives the same for one step's counts, for reports.

CPU experts (`cpu_gbps` > 0: `--cpu-experts auto` as the cache runs it): a step's misses whose block is in the RAM
tier (every miss when there is no RAM tier) are candidates; store/offload.py's CostModel places them greedily, with
the link's queue starting at the step's RAM-tier misses (they go to the link after their read). A miss placed on the
CPU is not loaded into a device slot (it touches its RAM block); the CPU starts at the step's start and takes
`cpu_overhead_s` plus block / cpu_gbps per expert, beside the link; the step's stall is the later of the two.

Partition "layer" gives each layer slots // L slots and its own policy (the reference figures of docs/metrics.md);
"global" shares all slots under one policy, like the cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from tiered.predict.predictors import Predictor
from tiered.predict.prefetch import PredictedEviction, choose
from tiered.predict.trace import Trace
from tiered.store.offload import CostModel
from tiered.store.policy import Policy, belady, make_policy

GB = 1e9


@dataclass(frozen=True)
class TierModel:
    slots: int  # device-tier expert slots in total (all layers)
    partition: str = "layer"  # "layer" (slots // L each, own policy) or "global" (one policy over all)
    policy: str = "lru"  # lru, lfu, flru or predicted
    flru_w: float | None = None  # flru weight in steps; default L (one use ~ one token of recency)
    ram_slots: int | None = None  # RAM tier slots (LRU); None = every expert in RAM
    prefetch_depth: int = 0  # layers ahead
    prefetch_budget: int = 0  # candidates per target layer
    block_bytes: int = 0  # bytes per expert block
    h2d_gbps: float = 53.0  # host -> device GB/s (measured on an H200 box: pinned, large copies)
    disk_gbps: float = 1.7  # disk -> RAM GB/s (measured on an H200 box: cold O_DIRECT)
    compute_s_per_layer: float = 0.0  # one layer's compute for one token, seconds
    host_s_per_miss: float = 0.0  # host seconds per device-tier miss (lookup, bookkeeping, issuing its copy)
    host_s_per_ram_miss: float = 0.0  # more host seconds per RAM-tier miss besides its read (registration, ...)
    overlap: bool = False  # the pipelined model (module doc); False = the serial sum
    evict_mix: tuple | None = None  # policy "predicted": (decay, w_prob, w_use) terms; None = DEFAULT_EVICT_MIX
    cpu_gbps: float = 0.0  # CPU-expert GB/s (bytes of expert blocks per second of CPU compute); 0 = no CPU experts
    cpu_overhead_s: float = 0.0  # fixed seconds of a step that computes experts on the CPU (hand-off, result copy)

    def __post_init__(self) -> None:
        if self.partition not in ("layer", "global"):
            raise ValueError(f"partition must be 'layer' or 'global', got {self.partition!r}")
        if self.prefetch_depth < 0 or self.prefetch_budget < 0:
            raise ValueError("prefetch depth and budget must be >= 0")
        if min(self.host_s_per_miss, self.host_s_per_ram_miss, self.compute_s_per_layer) < 0:
            raise ValueError("host and compute seconds must be >= 0")
        if self.cpu_gbps < 0 or self.cpu_overhead_s < 0:
            raise ValueError("cpu_gbps and cpu_overhead_s must be >= 0")
        if self.h2d_gbps <= 0 or self.disk_gbps <= 0:
            raise ValueError(f"h2d_gbps and disk_gbps must be > 0, got {self.h2d_gbps} and {self.disk_gbps}")


def step_terms(tiers: TierModel, demand: int, disk: int, prefetch: int = 0, cpu: int = 0) -> dict[str, float]:
    """Seconds of one step with `demand` device misses of which `disk` are RAM-tier misses (served last, as the
    cache does), `prefetch` prefetched blocks and `cpu` misses computed on the CPU: "total" and its parts. Serial
    model: the parts add up. Pipelined: "total" is the later of the link's pipeline and the CPU's work, plus
    compute, and the parts are each resource's busy time (they overlap)."""
    B = tiers.block_bytes
    p = B / (tiers.h2d_gbps * GB)
    r = B / (tiers.disk_gbps * GB)
    hv, hr = tiers.host_s_per_miss, tiers.host_s_per_ram_miss
    compute = max(tiers.compute_s_per_layer, prefetch * p)
    parts = {"compute": tiers.compute_s_per_layer, "pcie": (demand + prefetch) * p, "prefetch_pcie": prefetch * p,
             "host_miss": demand * hv, "host_ram_miss": disk * hr, "disk_read": disk * r, "cpu_experts": 0.0}
    if cpu:
        parts["cpu_experts"] = tiers.cpu_overhead_s + cpu * B / (tiers.cpu_gbps * GB)
    if not tiers.overlap:
        stall = demand * p + disk * r + demand * hv + disk * hr + parts["cpu_experts"]
    else:
        host = link = 0.0
        for i in range(demand):
            j = i - (demand - disk)  # index among the step's RAM-tier misses (they come last)
            if j >= 0:
                host = max(host, (j + 1) * r) + hr
            host += hv
            link = max(link, host) + p
        stall = max(link, parts["cpu_experts"])
    return {"total": compute + stall, "stall": stall, **parts}


@dataclass
class SimResult:
    uses: int = 0  # expert uses (tokens x layers x K)
    hits: int = 0  # device-tier hits
    ram_hits: int = 0  # device misses served by the RAM tier
    disk_reads: int = 0  # device misses read from disk
    prefetch_issued: int = 0  # experts loaded by prefetch
    prefetch_used: int = 0  # ... and used before being evicted
    cpu_experts: int = 0  # misses computed on the CPU (cpu_gbps > 0)
    tokens: int = 0
    seconds: float = 0.0  # modelled time
    stall_s: float = 0.0  # modelled demand-load time
    block_bytes: int = 0
    belady_hits: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def misses(self) -> int:
        return self.uses - self.hits

    def to_dict(self) -> dict[str, Any]:
        u = max(self.uses, 1)
        tok = max(self.tokens, 1)
        d = {
            "hit_rate": self.hits / u, "hits": self.hits, "misses": self.misses, "uses": self.uses,
            "ram_hit_rate": self.ram_hits / max(self.misses, 1), "disk_reads": self.disk_reads,
            "bytes_h2d_per_token": (self.misses - self.cpu_experts + self.prefetch_issued) * self.block_bytes / tok,
            "bytes_disk_per_token": self.disk_reads * self.block_bytes / tok,
            "prefetch_issued": self.prefetch_issued, "prefetch_used": self.prefetch_used,
            "prefetch_precision": self.prefetch_used / self.prefetch_issued if self.prefetch_issued else None,
            "prefetch_wasted_bytes": (self.prefetch_issued - self.prefetch_used) * self.block_bytes,
            "tokens": self.tokens, "tok_s": self.tokens / self.seconds if self.seconds > 0 else None,
            "cpu_experts": self.cpu_experts, "cpu_share": self.cpu_experts / max(self.misses, 1),
            "stall_share": self.stall_s / self.seconds if self.seconds > 0 else None,
        }
        if self.belady_hits is not None:
            d["belady_hit_rate"] = self.belady_hits / u
        d.update(self.extra)
        return d


def _make_policy(tiers: TierModel, L: int, E: int) -> Policy:
    if tiers.policy == "predicted":
        return PredictedEviction(L, E, mix=tiers.evict_mix)
    kw = {"w": tiers.flru_w if tiers.flru_w is not None else float(L)} if tiers.policy == "flru" else {}
    return make_policy(tiers.policy, **kw)


class _Tier:
    """Resident keys of one cache (a layer's or the global one) with its policy."""

    def __init__(self, capacity: int, policy: Policy) -> None:
        self.capacity = capacity
        self.policy = policy
        self.prefetched: set[int] = set()

    def hit(self, key: int, t: float, res: "SimResult") -> bool:
        """Count one use of `key`; a hit is touched (and a prefetched one counted as used)."""
        res.uses += 1
        if key not in self.policy:
            return False
        res.hits += 1
        self.policy.touch(key, t)
        if key in self.prefetched:
            self.prefetched.discard(key)
            res.prefetch_used += 1
        return True

    def load(self, key: int, t: float, pinned: set[int]) -> None:
        if len(self.policy) >= self.capacity:
            v = self.policy.victim(None, pinned)
            self.policy.remove(v)
            self.prefetched.discard(v)
        self.policy.insert(key, t)


def simulate(trace: Trace, tiers: TierModel, *, predictor: Predictor | None = None, max_tokens: int | None = None,
             with_belady: bool = True, on_step: Callable[[int, int], None] | None = None) -> SimResult:
    """Replay `trace` (every document in order; the predictor resets at document starts) through `tiers`.

    max_tokens: only the first max_tokens tokens of each document.
    """
    N, L, K = trace.topk_ids.shape
    E = trace.num_experts
    per_layer = tiers.partition == "layer"
    cap = tiers.slots // L if per_layer else tiers.slots
    if cap < K:
        raise ValueError(f"{tiers.slots} slots give {cap} per cache, fewer than top-k = {K}")
    n_caches = L if per_layer else 1
    pols = [_make_policy(tiers, L, E) for _ in range(n_caches)]
    caches = [_Tier(cap, p) for p in pols]
    evictors = [p for p in pols if isinstance(p, PredictedEviction)]
    ram = None if tiers.ram_slots is None else _Tier(tiers.ram_slots, make_policy("lru"))
    B = tiers.block_bytes
    res = SimResult(block_bytes=B)
    ids_all = trace.topk_ids.astype(np.int64)
    logits = None if trace.router_logits is None else torch.from_numpy(trace.router_logits.astype(np.float32))
    weights = torch.from_numpy(trace.topk_weights)
    hidden = None if trace.hidden is None else torch.from_numpy(trace.hidden)
    steps: list[list[list[int]]] = [[] for _ in range(n_caches)]  # per cache: keys per step, for Belady
    terms = {"compute": 0.0, "pcie": 0.0, "host_miss": 0.0, "host_ram_miss": 0.0, "disk_read": 0.0, "cpu_experts": 0.0}
    cost = None
    if tiers.cpu_gbps > 0:  # the cache's own placement rule
        cost = CostModel(tiers.h2d_gbps, tiers.cpu_gbps, cpu_overhead_s=tiers.cpu_overhead_s, fixed=True)
    clock = 0
    for d in range(trace.num_docs):
        a, b = int(trace.doc_offsets[d]), int(trace.doc_offsets[d + 1])
        if max_tokens is not None:
            b = min(b, a + max_tokens)
        if predictor is not None:
            predictor.reset()
        for n in range(a, b):
            res.tokens += 1
            for l in range(L):
                clock += 1
                ids_np = ids_all[n, l]
                ids = torch.from_numpy(ids_np)
                w = weights[n, l]  # without logits: the routed weights renormalised, as moe.routed_logits hands observers
                probs = torch.softmax(logits[n, l], -1) if logits is not None else \
                    torch.zeros(E).scatter_(0, ids, w / w.sum().clamp_min(1e-9))
                if evictors:  # each layer's policy hears its own layer (the global one hears all)
                    evictors[l if per_layer else 0].update(l, probs, torch.zeros(E).scatter_(0, ids, 1.0))
                if predictor is not None:
                    predictor.observe(l, hidden[n, l:l + 1] if hidden is not None else torch.zeros(1, 1), ids[None],
                                      None if logits is None else logits[n, l:l + 1], weights[n, l:l + 1])
                c = caches[l if per_layer else 0]
                keys = [l * E + int(e) for e in ids_np]
                steps[l if per_layer else 0].append(keys)
                pinned = set(keys)
                demand = disk = n_cpu = 0
                if cost is not None:
                    demand, disk, n_cpu = _split_step(keys, c, ram, cost, clock, pinned, res, B)
                else:
                    for k in keys:
                        if c.hit(k, clock, res):
                            continue
                        demand += 1
                        disk += _from_ram(ram, k, clock, res)
                        c.load(k, clock, pinned)
                pf = 0
                if predictor is not None and tiers.prefetch_depth > 0 and tiers.prefetch_budget > 0:
                    for tgt in range(l + 1, min(L, l + 1 + tiers.prefetch_depth)):
                        ct = caches[tgt if per_layer else 0]
                        cand = [tgt * E + int(e) for e in choose(predictor.rank(tgt), tiers.prefetch_budget)]
                        # as the cache does: never more than the slots the current step leaves free
                        cand = cand[:max(0, ct.capacity - (len(pinned) if ct is c else 0))]
                        protect = pinned | set(cand)
                        for k in cand:
                            if k in ct.policy:
                                continue
                            ct.load(k, clock, protect)
                            ct.prefetched.add(k)
                            pf += 1
                            disk += _from_ram(ram, k, clock, res)
                    res.prefetch_issued += pf
                st = step_terms(tiers, demand, disk, pf, n_cpu)
                res.stall_s += st["stall"]
                res.seconds += st["total"]
                for part in ("compute", "pcie", "host_miss", "host_ram_miss", "disk_read", "cpu_experts"):
                    terms[part] += st[part]
                if on_step is not None:
                    on_step(n, l)
    if with_belady:
        res.belady_hits = sum(belady(s, cap)[0] for s in steps)
    res.extra["terms_s"] = terms  # each resource's busy seconds (they overlap in the pipelined model)
    return res


def _split_step(keys: list[int], c: _Tier, ram: _Tier | None, cost: Any, t: float, pinned: set[int],
                res: SimResult, B: int) -> tuple[int, int, int]:
    """One step with CPU experts, in the cache's order (cache.get_slots): hits are touched; the misses whose block
    is in the RAM tier are placed by the cost model (the link's queue starts at the RAM-tier misses, which go to
    the link); CPU misses touch their RAM block and take no device slot; the rest are loaded, RAM-tier misses
    last. -> (device misses, of which RAM-tier misses, CPU misses)."""
    miss = [k for k in keys if not c.hit(k, t, res)]
    if not miss:
        return 0, 0, 0
    in_ram = [k for k in miss if ram is None or k in ram.policy]
    on_disk = [k for k in miss if not (ram is None or k in ram.policy)]
    where = cost.place(len(in_ram), B, pcie_queue_s=len(on_disk) * B / (cost.pcie_gbps * GB)) if in_ram else []
    n_cpu = 0
    for k, on_cpu in zip(in_ram, where):
        if on_cpu:  # served from the RAM tier in place
            n_cpu += 1
            res.ram_hits += 1
            if ram is not None:
                ram.policy.touch(k, t)
    res.cpu_experts += n_cpu
    link = [k for k, w in zip(in_ram, where) if not w] + on_disk
    disk = 0
    for k in link:
        disk += _from_ram(ram, k, t, res)
        c.load(k, t, pinned)
    return len(link), disk, n_cpu


def _from_ram(ram: _Tier | None, key: int, t: float, res: SimResult) -> int:
    """Serve a device-tier load from RAM (1 = it had to come from disk)."""
    if ram is None:
        res.ram_hits += 1
        return 0
    if key in ram.policy:
        ram.policy.touch(key, t)
        res.ram_hits += 1
        return 0
    res.disk_reads += 1
    ram.load(key, t, {key})
    return 1


def belady_hit_rate(trace: Trace, slots_per_layer: int, *, max_tokens: int | None = None) -> float:
    """Belady's demand-paging hit rate with per-layer caches of `slots_per_layer`, current step pinned."""
    N, L, K = trace.topk_ids.shape
    E = trace.num_experts
    hits = uses = 0
    for d in range(trace.num_docs):
        a, b = int(trace.doc_offsets[d]), int(trace.doc_offsets[d + 1])
        if max_tokens is not None:
            b = min(b, a + max_tokens)
        ids = trace.topk_ids[a:b].astype(np.int64)
        for l in range(L):
            h, m = belady([(l * E + ids[n, l]).tolist() for n in range(b - a)], slots_per_layer)
            hits += h
            uses += h + m
    return hits / uses if uses else 0.0
