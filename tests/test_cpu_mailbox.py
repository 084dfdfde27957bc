"""CPU experts inside the device step: resolve's split of a layer's misses (kernels/slot_table.py), the mailbox and
its native worker (model/cpu_mailbox.py, kernels/cpu_kernel.c `tiered_cpu_serve`), the device side of the handshake
(kernels/cpu_handoff.py) and the eager device step that runs them all (decode/devstep.py).

On CPU: the kernels under the Triton interpreter against the torch references, with the real worker thread
answering through the mailbox's memory; the whole step token for token against every expert resident. On CUDA: the
captured step, whose kernels talk to the worker over PCIe, against the host step.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

from tiered.decode.devstep import DeviceStep, cpu_split
from tiered.engine import _cpu_mailbox, load
from tiered.kernels import cpu_handoff as ch
from tiered.kernels import slot_table as st
from tiered.model.cpu_experts import cpu_partial
from tiered.kernels.cpu_kernel import CpuKernel
from tiered.store.devtable import DeviceSlotTable
from tiered.store.offload import CostModel

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
NEW = 20
B = 49152  # the reference model's expert block
CUDA = torch.cuda.is_available()
needs_kernel = pytest.mark.skipif(CpuKernel.load(warn=False) is None, reason="no C compiler for the native kernel")


def _tables(N: int, S: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"slot_of": torch.full((N,), -1, dtype=torch.int32), "key_of": torch.full((S,), -1, dtype=torch.int32),
            "last": torch.zeros(S, dtype=torch.int64), "uses": torch.zeros(S, dtype=torch.int64),
            "clock": torch.zeros(1, dtype=torch.int64), "counts": torch.zeros(7, dtype=torch.int64),
            "host_row": torch.randperm(N, generator=g).to(torch.int64)}


@pytest.mark.parametrize("split", [False, True, "admit"])
@pytest.mark.parametrize("scored", [False, True])
@pytest.mark.parametrize("L,E,K,S", [(3, 8, 4, 9), (2, 12, 8, 10)])
def test_resolve_cpu_split_matches_reference(L, E, K, S, scored, split):
    """With a CPU split, the kernel (interpreter) equals the reference after every call of a random trace: the
    misses it sends to the CPU get the zero slot, their RAM row and no table entry; the others are resolved as
    before; counts[4] counts the CPU's, which are misses too. split: besides, the next miss in the CPU's order is
    split by rows when split[m] > 0: the split slot, its RAM row to copy, its row code for the CPU, no table
    entry; split_c the call's rows, slot and RAM row; counts[5] and [6] count them. admit: the split miss takes
    a slot of its own, as a copied miss does, reserved (the later layers neither find nor evict it) until the
    step's end, when split_install (kernel and reference) enters it."""
    a, b = _tables(L * E, S), _tables(L * E, S)
    rng = random.Random(L * 10 + S + scored)
    zero, sslot = S, S + 1
    n_cpu = n_split = 0
    split_c = torch.zeros(L, 3, dtype=torch.int64)  # admit: each layer's split, installed after the last layer
    admitted: list[tuple[int, int]] = []
    for step in range(60):
        layer = step % L
        ids = torch.tensor(rng.sample(range(E), K), dtype=torch.int64)
        take = torch.tensor([0] + [rng.randint(0, m) for m in range(1, K + 1)], dtype=torch.int32)
        rows = torch.tensor([0] + [rng.choice([0, 32, 64]) if take[m] < m else 0 for m in range(1, K + 1)],
                            dtype=torch.int32)
        nt = torch.tensor([rng.randint(0, 40) for _ in range(L * E)], dtype=torch.int64) if scored else None
        outs = []
        for t in (a, b):
            slot, src, row = (torch.full((K,), -7, dtype=torch.int64) for _ in range(3))
            sc = torch.full((3,), -7, dtype=torch.int64)
            cpu = (take, row, zero) + ((rows, sslot, sc, split == "admit") if split else ())
            if t is a:
                st._resolve_kernel[(1,)](ids, layer * E, t["slot_of"], t["key_of"], t["last"], t["uses"], t["clock"],
                                         t["counts"], t["host_row"], slot, src, slot, nt if scored else slot, K, S, 0,
                                         0, 0, K_P=st._p2(K), S_P=st._p2(S), P_P=1, PREFETCH=False, SCORED=scored,
                                         **st._cpu_args(cpu, slot))
            else:
                st.resolve_reference(ids, layer, E, t, 0, slot, src, nt=nt, cpu=cpu)
            outs.append((slot, src, row, sc))
        for x, y in zip(outs[0][:3], outs[1][:3]):
            assert torch.equal(x, y), (step, outs)
        if split:
            assert torch.equal(outs[0][3], outs[1][3]), (step, outs)
        for k in a:
            assert torch.equal(a[k], b[k]), (step, k)
        slot, src, row, sc = outs[0]
        sp = row < -1
        if split and int(sp.sum()):
            n_split += 1
            keys = layer * E + ids
            assert int(sp.sum()) == 1 and int(sc[0]) > 0 and int(sc[1]) == int(slot[sp]) and int(sc[2]) == int(src[sp])
            assert int(src[sp]) == int(a["host_row"][keys[sp]])
            if split == "admit":  # a slot of its own, reserved (neither found nor evicted) until the step's end
                assert 0 <= int(slot[sp]) < S and int(a["slot_of"][keys[sp]]) == -1
                assert int(a["key_of"][slot[sp]]) == -2 - int(keys[sp])
                admitted.append((int(keys[sp]), int(slot[sp])))
            else:
                assert int(slot[sp]) == sslot and int(a["slot_of"][keys[sp]]) == -1
            assert int(row[sp]) == -2 - int(src[sp]) * st.SPLIT_BASE - int(sc[0])
        elif split:
            assert sc.tolist() == [0, -1, -1]
        if split == "admit":
            split_c[layer] = sc
            if layer == L - 1:  # the step's end: the reserved slots enter the table (kernel, then reference)
                st._split_install_kernel[(1,)](split_c, a["slot_of"], a["key_of"], L, R_P=st._p2(L))
                st.split_install_reference(split_c, b)
                for k, s_ in admitted:
                    assert int(a["slot_of"][k]) == s_ and int(a["key_of"][s_]) == k
                admitted.clear()
                split_c.zero_()
                assert bool((a["key_of"] >= -1).all())
        on_cpu = row >= 0
        n_cpu += int(on_cpu.sum())
        assert bool((slot[on_cpu] == zero).all()) and bool((src[on_cpu] == -1).all())
        keys = layer * E + ids
        assert bool((a["slot_of"][keys[on_cpu]] == -1).all())  # a CPU expert stays out of the device tier
        assert bool((row[on_cpu] == a["host_row"][keys[on_cpu]]).all())
        if scored and int(on_cpu.sum()):  # the CPU takes the misses predicted to be needed last
            missed = (src >= 0) | on_cpu
            copied = nt[keys[missed & ~on_cpu]].tolist()
            assert int(nt[keys[on_cpu]].min()) >= max(copied, default=-1)
    assert n_cpu > 0 and int(a["counts"][4]) == n_cpu
    assert int(a["counts"][0]) + int(a["counts"][1]) == 60 * K
    if split:
        assert n_split > 0 and int(a["counts"][5]) == n_split and int(a["counts"][6]) >= 32 * n_split


def test_split_gather_matches_reference():
    """The gather (interpreter, both kernels) into the split slot skips the CPU's rows: gate's and up's first c
    rows become zero without being read, down's first c columns keep what the slot held; other rows copy whole;
    c = 0 copies the split slot whole."""
    S, F, D, esz = 4, 64, 8, 2  # bf16 gate [F, D], up [F, D], down [D, F] per block, then 16 bytes of padding
    B = 3 * F * D * esz + 16
    torch.manual_seed(0)
    host = torch.randint(0, 255, (6, B), dtype=torch.uint8)
    base = torch.randint(0, 255, (S, B), dtype=torch.uint8)

    class W:
        pool = base
        gate = base[:, :F * D * esz].view(torch.bfloat16).view(S, F, D)
        up = base[:, F * D * esz:2 * F * D * esz].view(torch.bfloat16).view(S, F, D)
        down = base[:, 2 * F * D * esz:3 * F * D * esz].view(torch.bfloat16).view(S, D, F)

    spec = st.split_spec(base, W)
    assert spec is not None and spec[1:] == [0, F * D // 2, D // 2, F * D, F // 2, D * F // 2, 2]
    spec[0] = 3
    spec_t = torch.tensor(spec, dtype=torch.int64)
    src = torch.tensor([2, -1, 5, 1], dtype=torch.int64)
    dst = torch.tensor([0, 1, 3, 2], dtype=torch.int64)
    for c in (0, 32):
        sc = torch.tensor([c, 3, 5], dtype=torch.int64)  # the call's split: rows, slot, RAM row
        want = base.clone()
        st.gather(host, src, dst, want, split=(spec_t, sc))  # the CPU path: the reference
        exp = base.clone()
        for s_, d_ in ((2, 0), (1, 2)):
            exp[d_] = host[s_]
        e = exp[3].view(torch.int32)
        e.copy_(host[5].view(torch.int32))
        if c:
            e[:c * D // 2] = 0
            e[F * D // 2:F * D // 2 + c * D // 2] = 0
            e[F * D:F * D + D * F // 2].view(D, F // 2)[:, :c // 2] = \
                base[3].view(torch.int32)[F * D:F * D + D * F // 2].view(D, F // 2)[:, :c // 2]
        assert torch.equal(want, exp), c
        for strided in (False, True):
            assert torch.equal(_split_gather_kernel(host, src, dst, base, spec_t, sc, strided, False), exp), (c, strided)
        # the admitted split's later copy: only the CPU's rows of the split slot, the rest untouched
        inv = exp.clone()
        st.gather(host, src, dst, inv, split=(spec_t, sc), inverse=True)
        assert torch.equal(inv[3], host[5]) and torch.equal(inv[[0, 1, 2]], exp[[0, 1, 2]])
        for strided in (False, True):
            assert torch.equal(_split_gather_kernel(host, src, dst, exp, spec_t, sc, strided, True), inv), (c, strided)


def _split_gather_kernel(host, src, dst, before, spec, sc, strided: bool, inverse: bool) -> torch.Tensor:
    """One split gather by the kernel (interpreter, tiny blocks: BLOCK 16, CHUNKS 2) into a copy of `before`."""
    got = before.clone()
    words = got.shape[1] // 4
    n_c = -(-words // (16 * 2))
    kw = {"BLOCK": 16, "CHUNKS": 2, "spec": spec, "split_c": sc, "SPLIT": True, "INVERSE": inverse}
    if strided:
        st._gather_strided_kernel[(3,)](host.view(torch.int32), src, dst, got.view(torch.int32), words,
                                        src.shape[0] * n_c, n_c, **kw)
    else:
        st._gather_kernel[(src.shape[0], n_c)](host.view(torch.int32), src, dst, got.view(torch.int32), words, **kw)
    return got


def test_cpu_split_follows_the_cost_model():
    """take[m] from the cost model: none for no miss; a slow link sends more of a layer's misses to the CPU, a
    large fixed cost fewer; without a CPU rate nothing goes there."""
    class P:
        block_size = 9 * 2 ** 20
        cost_model = CostModel(50.0, 70.0, cpu_overhead_s=20e-6)

    class Box:
        overhead_s = 20e-6

    fast = cpu_split(P, 8, Box)
    assert fast[0] == 0 and fast == sorted(fast) and 0 < fast[8] < 8
    P.cost_model = CostModel(12.0, 70.0)
    slow = cpu_split(P, 8, Box)
    assert all(s >= f for s, f in zip(slow, fast)) and slow[8] > fast[8]
    Box.gbps = 1000.0  # the mailbox's own rate, when measured, wins over the provider's probe
    assert cpu_split(P, 8, Box)[8] > slow[8]
    Box.gbps = None
    Box.overhead_s = 1.0
    assert cpu_split(P, 8, Box) == [0] * 9
    P.cost_model = CostModel(50.0, 0.0)
    assert cpu_split(P, 8, Box) == [0] * 9


def test_cpu_row_split_follows_the_cost_model():
    """(take, split) from the same costs: at the H200 box's rates a lone miss is split (the CPU its first rows, a
    multiple of the granule, the link the rest) rather than copied whole or sent whole; more misses send whole
    ones too; a split only where a miss is left to split; a large fixed cost or no CPU rate: nothing to the CPU."""
    from tiered.decode.devstep import cpu_row_split

    class P:
        block_size = 9437184
        cost_model = CostModel(54.0, 47.0, cpu_overhead_s=17e-6)

    class Box:
        overhead_s, gbps = 17e-6, None

    take, split = cpu_row_split(P, 8, Box, 768, 24)
    assert take[0] == split[0] == 0 and take[1] == 0 and 0 < split[1] < 768 and split[1] % 24 == 0
    assert all(0 <= t <= m and (not r or t < m) for m, (t, r) in enumerate(zip(take, split)))
    assert take == sorted(take) and take[8] >= 2
    c, cc = P.block_size / 54e9, P.block_size / 47e9
    for m in range(1, 9):  # never slower than the best whole split, nor than copying all
        f = take[m] + split[m] / 768
        t = max((m - f) * c, 17e-6 + f * cc)
        whole = min(max((m - k) * c, 17e-6 + k * cc if k else 0.0) for k in range(m + 1))
        assert t <= whole + 1e-12 and t < m * c
    Box.overhead_s = 1.0
    assert cpu_row_split(P, 8, Box, 768, 24) == ([0] * 9, [0] * 9)
    P.cost_model = CostModel(54.0, 0.0)
    Box.overhead_s = 17e-6
    assert cpu_row_split(P, 8, Box, 768, 24) is None
    assert cpu_row_split(P, 8, Box, 32, 24) is None  # too few rows to split


def _engine(reference_layout, slots: int = 8, **budget):
    eng = load(reference_layout, device="cpu",
               budget={"expert_slots": slots, "ram_gb": 600 * B / 2 ** 30, "cpu_experts": "auto", **budget})
    cache = eng.model.provider
    cache.ram.preload(list(range(cache.num_layers * cache.num_experts)), 0)
    return eng, cache


def test_split_row_only_with_cpu_split_auto(reference_layout):
    """--cpu-split off (the default) and admit keep no split row: a split that is not admitted is refused there,
    an admitted one is taken (it needs only the views' mask); auto adds the zeroed row after the zero row, whose
    mask the table derives from the expert views."""
    for mode in ("off", "admit", "auto"):
        eng, cache = _engine(reference_layout, 8, cpu_split=mode)
        try:
            t = DeviceSlotTable(cache, w=0, kernels=st)
            S = cache.vram.n_slots
            if mode != "auto":
                assert cache.vram.split_slot is None and int(t.split_spec[0]) == -1 and t.split_F == 32
                with pytest.raises(ValueError, match="split row"):
                    t.set_cpu_take([0] * 9, [0, 2] + [0] * 7)
                t.set_cpu_take([0] * 9, [0, 2] + [0] * 7, admit=True)
                assert t.split_admit and t.cpu_split is not None
            else:
                assert cache.vram.split_slot == S + 1 and cache.vram.pool.shape[0] == S + 2
                assert int(t.split_spec[0]) == S + 1 and t.split_F == 32
                assert not bool(cache.vram.pool[S + 1].any())
        finally:
            cache.close()
    with pytest.raises(Exception, match="cpu-split"):
        load(reference_layout, device="cpu", budget={"expert_slots": 8, "cpu_split": "sometimes"})


@needs_kernel
def test_handoff_kernels_and_worker(reference_layout):
    """post and wait (interpreter) against the worker thread: y is the jobs' weighted sum as cpu_partial computes
    it, added to the output in place; a layer without CPU jobs posts nothing and adds nothing; the host side
    shares the post count."""
    eng, cache = _engine(reference_layout)
    try:
        box, why = _cpu_mailbox(cache, eng.config, eng.dtype, False)
        assert box is not None, why
        assert box.running and box.overhead_s is not None and box.overhead_s < 0.5
        K, D = eng.config.top_k, eng.config.hidden_size
        g = torch.Generator().manual_seed(3)
        x, w = torch.randn(1, D, generator=g), torch.rand(K, generator=g)
        rows = torch.full((K,), -1, dtype=torch.int64)
        rows[1], rows[4] = 5, 17
        seq = torch.zeros(3, dtype=torch.int32)
        out = torch.full((1, D), 7.0)
        before = int(box.ctl[0])
        ch._post_kernel[(1,)](x, w, rows, seq, box.rows, box.wts, box.x, box.ctl, K, D, K_P=8, D_P=ch._p2(D),
                              FENCE=False)
        assert int(seq[0]) == int(box.ctl[0]) == before + 1
        ch._wait_kernel[(1,)](seq, box.ctl, box.y, out, D, 1 << 22, D_P=ch._p2(D), FENCE=False)
        assert int(seq[1]) == int(seq[0]) and int(seq[2]) == 0
        V = cache.ram_views()
        ref = cpu_partial(x, w, [(1, V, 5), (4, V, 17)], None, kernel=None)
        torch.testing.assert_close(out, 7.0 + ref, rtol=1e-5, atol=1e-6)  # added to the device experts' output
        out.fill_(7.0)
        rows.fill_(-1)
        ch._post_kernel[(1,)](x, w, rows, seq, box.rows, box.wts, box.x, box.ctl, K, D, K_P=8, D_P=ch._p2(D),
                              FENCE=False)
        ch._wait_kernel[(1,)](seq, box.ctl, box.y, out, D, 1 << 22, D_P=ch._p2(D), FENCE=False)
        assert int(box.ctl[0]) == before + 1 and bool((out == 7.0).all())  # nothing posted, nothing added
        out.zero_()
        # the host side continues the same count, and a wait that never gets its answer gives up and says so
        rows[0] = 3
        ch.post_reference(x, w, rows, seq, box)
        assert int(seq[0]) == before + 2
        ch.wait_reference(seq, box, out)
        torch.testing.assert_close(out, cpu_partial(x, w, [(0, V, 3)], None, kernel=None), rtol=1e-5, atol=1e-6)
        seq[0] = int(seq[0]) + 5  # a post number the worker never saw
        ch._wait_kernel[(1,)](seq, box.ctl, box.y, out, D, 50, D_P=ch._p2(D), FENCE=False)
        with pytest.raises(RuntimeError, match="in vain"):
            ch.check(seq)
    finally:
        cache.close()
    assert not box.running


@needs_kernel
def test_worker_computes_a_split_job(reference_layout):
    """A split job (row code <= -2) next to a whole one: the worker computes only the split expert's first c FFN
    rows (gate's and up's rows, down's columns), the rest being the device's; the post's other jobs are whole."""
    eng, cache = _engine(reference_layout)
    try:
        box, why = _cpu_mailbox(cache, eng.config, eng.dtype, False)
        assert box is not None, why
        K, D = eng.config.top_k, eng.config.hidden_size
        g = torch.Generator().manual_seed(4)
        x, w = torch.randn(1, D, generator=g), torch.rand(K, generator=g)
        V = cache.ram_views()
        F = V.gate.shape[1]
        c = st.split_granule(F)
        rows = torch.full((K,), -1, dtype=torch.int64)
        rows[6], rows[2] = -2 - 17 * st.SPLIT_BASE - c, 5  # the split one first: the worker puts it last
        seq = torch.zeros(3, dtype=torch.int32)
        out = torch.zeros(1, D)
        ch.post_reference(x, w, rows, seq, box)
        ch.wait_reference(seq, box, out)
        xf = x.float().view(-1)
        gt, up, dn = (m[17].float() for m in (V.gate, V.up, V.down))
        h = torch.nn.functional.silu(gt[:c] @ xf) * (up[:c] @ xf)
        part = (dn[:, :c] @ h) * w[6]
        ref = cpu_partial(x, w, [(2, V, 5)], None, kernel=None).float() + part
        torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-5)
        assert int(box.ctl[3]) == 0
    finally:
        cache.close()


@needs_kernel
def test_worker_serves_a_post_made_before_it_started(reference_layout):
    """The worker starts from the last number answered, not the last posted: a post that lands before its thread
    runs (a busy machine) is served, not lost (which hung the waiting step)."""
    from tiered.model.cpu_mailbox import CpuMailbox

    eng, cache = _engine(reference_layout)
    box = CpuMailbox(cache.cpu_kernel or CpuKernel.load(), cache.ram_views(), K=eng.config.top_k,
                     D=eng.config.hidden_size, dtype=eng.dtype, threads=1)
    try:
        D = eng.config.hidden_size
        x = torch.randn(1, D, generator=torch.Generator().manual_seed(5))
        rows = torch.full((eng.config.top_k,), -1, dtype=torch.int64)
        rows[2] = 9
        w = torch.rand(eng.config.top_k, generator=torch.Generator().manual_seed(6))
        posted = box.post(x, rows, w)
        box.start()
        out = box.wait(torch.empty(1, D), posted, timeout_s=20)
        want = cpu_partial(x, w, [(2, cache.ram_views(), 9)], None, kernel=None)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    finally:
        box.close()
        cache.close()


@needs_kernel
@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this platform")
def test_pinned_worker_serves_and_reports_its_pins(reference_layout):
    """With cpus, every team thread pins itself (stat[4] counts them; stats name the CPUs) and the answer is the
    unpinned worker's."""
    from tiered.model.cpu_mailbox import CpuMailbox

    eng, cache = _engine(reference_layout)
    cpu = sorted(os.sched_getaffinity(0))[-1]
    D, K = eng.config.hidden_size, eng.config.top_k
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(7))
    w = torch.rand(K, generator=torch.Generator().manual_seed(8))
    rows = torch.full((K,), -1, dtype=torch.int64)
    rows[1], rows[4] = 3, 11
    outs = []
    try:
        for cpus in ([cpu], None):
            box = CpuMailbox(cache.cpu_kernel or CpuKernel.load(), cache.ram_views(), K=K, D=D, dtype=eng.dtype,
                             threads=2, cpus=cpus).start()
            try:
                outs.append(box.wait(torch.empty(1, D), box.post(x, rows, w), timeout_s=20).clone())
                st_ = box.stats()
                assert st_["cpus"] == (cpus or []) and st_["pinned"] == (2 if cpus else 0), st_
            finally:
                box.close()
        assert torch.equal(outs[0], outs[1])
    finally:
        cache.close()


def test_worker_cpus_one_a_core_first(tmp_path, monkeypatch):
    """worker_cpus takes each physical core's lowest CPU, cores by (NUMA node, first CPU), before any second
    hardware thread; [] where the topology cannot be read."""
    from tiered.store.offload import worker_cpus

    # 2 nodes x 2 cores x 2 threads: CPUs 0-3 node 1 (cores 0, 1), 4-7 node 0; siblings c and c + 2 in each node
    for c in range(8):
        d = tmp_path / f"cpu{c}"
        (d / "topology").mkdir(parents=True)
        (d / "topology" / "physical_package_id").write_text(f"{int(c < 4)}\n")
        (d / "topology" / "core_id").write_text(f"{c % 2}\n")
        (d / f"node{int(c < 4)}").mkdir()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert worker_cpus(4, str(tmp_path)) == [4, 5, 0, 1]
    assert worker_cpus(8, str(tmp_path)) == [4, 5, 0, 1, 6, 7, 2, 3]
    assert worker_cpus(2, str(tmp_path)) == [4, 5]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1, 2, 3}, raising=False)
    assert worker_cpus(8, str(tmp_path)) == [1, 2, 3]  # CPU 3 shares core 1 with CPU 1: last
    assert worker_cpus(2, str(tmp_path / "none")) == []


@pytest.fixture(scope="module")
def unlimited(reference_layout) -> list[int]:
    return load(reference_layout, device="cpu").generate(PROMPT, max_new_tokens=NEW).token_ids


@needs_kernel
@pytest.mark.parametrize("slots,evict,prefetch,rows", [(8, "policy", 0, False), (24, "policy", 0, False),
                                                       (24, "nextuse", 0, False), (24, "nextuse", 3, False),
                                                       (8, "policy", 0, True), (24, "nextuse", 3, True),
                                                       (16, "policy", 0, "admit"), (24, "nextuse", 0, "admit")])
def test_device_step_cpu_experts_greedy_identical(reference_layout, unlimited, slots, evict, prefetch, rows):
    """The eager device step sending misses to the CPU worker (a forced split: up to 2 of a layer's misses, the
    latest predicted next use first under nextuse; with a device prefetch too, whose pins then include the zero
    slot) gives every-expert-resident greedy tokens; the counters add up: CPU experts are misses, not copies; the
    worker served them. rows: none of a lone miss, else 1 whole miss, and the next one split by FFN rows (the CPU
    its first 2, 16 or 30 of 32 by the miss count; the split row copies the rest): the same tokens, and the bytes
    copied are the misses' less the CPU's share. admit: the split miss takes a slot, reserved while its CPU rows
    are copied after the layer and entered at the step's end (the next use hits): the same tokens, every miss but
    the CPU's whole ones copied, no slot left reserved; fewer than top-k + 8 slots are refused."""
    if rows == "admit" and slots == 16:
        eng, cache = _engine(reference_layout, 8, cpu_split="admit")
        try:
            cache.devtable = DeviceSlotTable(cache, w=0, kernels=st)
            box, _ = _cpu_mailbox(cache, eng.config, eng.dtype, eng.model.fp32_route_weights)
            with pytest.raises(ValueError, match="top-k \\+ 8 device slots"):
                DeviceStep(eng.model, graphs=False, cpu=box, cpu_take=[0] + [1] * 8, cpu_rows=[0, 2] + [16] * 7,
                           cpu_admit=True)
            box.close()
        finally:
            cache.close()
    eng, cache = _engine(reference_layout, slots, **({"cpu_split": "auto" if rows is True else rows} if rows else {}))
    try:
        cache.devtable = DeviceSlotTable(cache, w=0, kernels=st)
        box, why = _cpu_mailbox(cache, eng.config, eng.dtype, eng.model.fp32_route_weights)
        assert box is not None, why
        served = int(box.stat[1])
        K = eng.config.top_k
        tr = None
        if evict == "nextuse":
            from test_devtable import _code_transitions
            tr = _code_transitions(reference_layout)
        take = [min(m - 1, 1) if rows and m else min(m, 2) for m in range(K + 1)]
        split = [0, 2, 16, 30] + [16] * (K - 3) if rows else None
        eng.devstep = DeviceStep(eng.model, graphs=False, cpu=box, cpu_take=take, cpu_rows=split, evict=evict,
                                 transitions=tr, prefetch=prefetch, cpu_admit=rows == "admit")
        eng.pieces = None
        assert eng.generate(PROMPT, max_new_tokens=NEW).token_ids == unlimited
        s = eng.stats
        d, c, sl = s["decode"], s["cpu_experts"], s["slot_table"]
        assert d["hits"] + d["misses"] == d["tokens"] * 8 * K
        assert c["count"] > 0 and sl["cpu_misses"] == c["count"]
        B = cache.block_size
        if rows != "admit":
            assert d["bytes_h2d"] == (d["misses"] + sl["prefetched"]) * B - c["bytes"]
        if rows:
            assert sl["cpu_split_misses"] > 0 and sl["cpu_split_rows"] >= 2 * sl["cpu_split_misses"]
            assert c["bytes"] == (c["count"] - sl["cpu_split_misses"]) * B + sl["cpu_split_rows"] * B // 32
        else:
            assert c["bytes"] == c["count"] * B and sl["cpu_split_misses"] == 0
        if rows == "admit":  # the split experts were copied too (their CPU rows after the layer)
            assert d["bytes_h2d"] == (d["misses"] + sl["prefetched"] - c["count"] + sl["cpu_split_misses"]) * B
        assert sl["bytes"] == d["bytes_h2d"]  # the slot table's copied bytes are the decode phase's (admit too)
        # the link rate is the host's timed copies (the prefill's) alone: the graph's gathers are not timed
        assert s["vram"]["gbps"] == pytest.approx(s["prefill"]["bytes_h2d"] / s["vram"]["copy_s"] / 1e9)
        assert int(box.stat[1]) - served == c["count"] and c["gbps"] > 0
        assert s["device_step"]["cpu"]["take"] == take and s["device_step"]["cpu"]["split"] == split
        assert s["device_step"]["cpu"]["admit"] == (rows == "admit")
        t = cache.devtable  # every resident slot holds its expert whole (an admitted split's rows were copied)
        assert min(t.t["key_of"].tolist()) >= -1  # no slot left reserved: every admitted split was entered
        for slot_i, key in enumerate(t.t["key_of"].tolist()):
            if key >= 0:
                assert torch.equal(t.slots[slot_i], t.host_pool[int(t.t["host_row"][key])]), (slot_i, key)
        eng.devstep.cpu_seq[2] = 1  # a wait that gave up: the stats say so instead of passing zeros off as y
        with pytest.raises(RuntimeError, match="in vain"):
            eng.devstep.stats()
        eng.devstep.cpu_seq[2] = 0
        cache.devtable.give_back()
        cache.vram.table.check()  # no CPU expert entered the host's table either
    finally:
        cache.close()


def test_device_table_with_cpu_auto_on_cpu_stays_on_host(reference_layout):
    """--cpu-experts auto no longer keeps the device table away (only the device does here): the run decodes on
    the host path with its CPU experts."""
    eng = load(reference_layout, device="cpu", budget={"expert_slots": 16, "cpu_experts": "auto",
                                                       "slot_table": "auto"})
    eng.generate(PROMPT, max_new_tokens=2)
    assert eng.stats["slot_table"]["mode"] == "host" and "CUDA" in eng.stats["slot_table"]["device_refused"]
    eng.model.provider.close()


_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tiered.kernels import cpu_handoff as ch
tgt = GPUTarget("cuda", 90, 32)
sigp = {"x_ptr": "*bf16", "wts_ptr": "*fp32", "cpu_row": "*i64", "seq": "*i32", "box_rows": "*i64",
        "box_wts": "*fp32", "box_x": "*bf16", "ctl": "*i32", "n_k": "i32", "D": "i32", "K_P": "constexpr",
        "D_P": "constexpr", "FENCE": "constexpr", "GDC": "constexpr"}
k = triton.compile(ASTSource(ch._post_kernel, sigp, constexprs={"K_P": 8, "D_P": 2048, "FENCE": True, "GDC": True}),
                   target=tgt)
assert k.asm["cubin"] and "fence.sc.sys" in k.asm["ptx"] and "ld.volatile" in k.asm["ptx"]
sigw = {"seq": "*i32", "ctl": "*i32", "box_y": "*bf16", "out": "*bf16", "D": "i32", "spin_max": "i32",
        "D_P": "constexpr", "FENCE": "constexpr", "GDC": "constexpr"}
k = triton.compile(ASTSource(ch._wait_kernel, sigw, constexprs={"D_P": 2048, "FENCE": True, "GDC": True}),
                   target=tgt)
assert k.asm["cubin"] and "ld.volatile" in k.asm["ptx"] and "fence.sc.sys" in k.asm["ptx"]
print("ok")
"""


def test_handoff_kernels_compile_for_sm90():
    """The real compiler accepts both handshake kernels (fence and volatile loads present) for an H100/H200 target:
    what the interpreter cannot check (resolve with the CPU split: test_devtable's compile test)."""
    from conftest import compile_sm90

    compile_sm90(_COMPILE)


@pytest.mark.cuda
@pytest.mark.parametrize("evict,rows", [("policy", False), ("nextuse", False), ("policy", True),
                                        ("policy", "admit")])
def test_cuda_device_step_cpu_experts_match_host(reference_layout, evict, rows):
    """The captured device step whose kernels post misses to the worker over PCIe and wait for its answer (a forced
    split, so the tiny model's blocks, which the cost model would all copy, go there; rows: and a miss split by
    FFN rows, the gather's split mask and the worker's partial job): in fp32 (the CPU sums in
    another order; bf16 is held to tolerances in test_cpu_experts.py) greedy tokens identical to the host step
    without CPU experts, the worker served every CPU miss, no wait gave up."""
    budget = {"expert_slots": 16, "ram_gb": 0.05}
    ref = load(reference_layout, device="cuda", dtype="float32", budget={**budget, "slot_table": "host"})
    want = ref.generate(PROMPT, max_new_tokens=32).token_ids
    ref.model.provider.close()
    tr = None
    if evict == "nextuse":
        from test_devtable import _code_transitions
        tr = _code_transitions(reference_layout)
    eng = load(reference_layout, device="cuda", dtype="float32",
               budget={**budget, "slot_table": "device", "cpu_experts": "auto",
                       "cpu_split": ("auto" if rows is True else rows) if rows else "off"})
    cache = eng.model.provider
    try:
        box = cache.cpu_box
        assert box is not None and eng.devstep is not None and eng.devstep.cpu is box
        assert 0 <= box.overhead_s < 0.01 and box.gbps > 0  # probe_device: the kernels' round trip, the rate
        K = eng.config.top_k
        take = [min(m - 1, 1) if rows and m else min(m, 2) for m in range(K + 1)]
        eng.devstep = DeviceStep(eng.model, cpu=box, cpu_take=take, evict=evict, transitions=tr,
                                 cpu_rows=[0, 2, 16, 30] + [16] * (K - 3) if rows else None,
                                 cpu_admit=rows == "admit")
        eng.devstep.capture_all()
        g = eng.generate(PROMPT, max_new_tokens=32)
        assert g.token_ids == want
        s = eng.stats
        assert s["decode_graphs"] == "device" and s["cpu_experts"]["count"] > 0
        assert s["slot_table"]["cpu_misses"] == s["cpu_experts"]["count"]
        assert (s["slot_table"]["cpu_split_misses"] > 0) == bool(rows)
        ch.check(eng.devstep.cpu_seq)
        assert int(eng.devstep.cpu_seq[0]) == int(box.ctl[1])  # the last post was answered
        assert min(cache.devtable.t["key_of"].tolist()) >= -1  # admit: every reserved split slot was entered
    finally:
        cache.close()


@pytest.mark.cuda
def test_cuda_default_cpu_experts(reference_layout):
    """--cpu-experts unset where the device slot table runs: the default resolves to auto; the engine keeps the CPU
    path only when the load-time probe's table gives the CPU one of a layer's two misses, else drops it with a note
    (no mailbox, no handshake kernels). Either way the fp32 greedy tokens are the host step's without CPU experts."""
    budget = {"expert_slots": 16, "ram_gb": 0.05}
    ref = load(reference_layout, device="cuda", dtype="float32", budget={**budget, "slot_table": "host"})
    want = ref.generate(PROMPT, max_new_tokens=32).token_ids
    assert ref.stats["cpu_experts"]["mode"] == "off" and ref.stats["cpu_experts"]["default"] is True
    ref.model.provider.close()
    eng = load(reference_layout, device="cuda", dtype="float32", budget=budget)
    cache = eng.model.provider
    try:
        assert eng.generate(PROMPT, max_new_tokens=32).token_ids == want
        s = eng.stats
        c = s["cpu_experts"]
        assert s["decode_graphs"] == "device" and c["default"] is True
        if c["mode"] == "auto":
            assert eng.devstep.cpu is cache.cpu_box is not None and eng.devstep.cpu_take[2] > 0
        else:
            assert c["mode"] == "off" and "probe" in c["note"] and eng.devstep.cpu is None and cache.cpu_box is None
    finally:
        cache.close()


def test_cpu_guard_lowers_the_take_table_for_a_slow_worker(monkeypatch):
    """The CPU-rate guard: the load-time table while the worker's achieved rate holds at least CPU_GUARD of the
    rate it assumed; below, the table at the achieved rate, never above the load-time one; back to the load-time
    table when the rate recovers. A window with too few experts waits; TIERED_CPU_RETUNE parses."""
    from types import SimpleNamespace

    from tiered.decode import devstep as ds

    class P:
        block_size = 9 * 2 ** 20
        cost_model = CostModel(50.0, 70.0, cpu_overhead_s=18e-6)

    box = SimpleNamespace(gbps=90.0, overhead_s=18e-6)
    load = cpu_split(P, 8, box)  # assumes 90 x CPU_CONTENTION = 76.5 GB/s
    assume = 90.0 * ds.CPU_CONTENTION
    assert ds.guarded_take(P, 8, box, assume, load) == load
    assert ds.guarded_take(P, 8, box, 0.85 * assume, load) == load  # within the guard's margin
    slow = ds.guarded_take(P, 8, box, 30.0, load)
    assert slow == cpu_split(P, 8, box, gbps=30.0) and all(a <= b for a, b in zip(slow, load)) and slow != load
    fast_table = cpu_split(P, 8, box, gbps=500.0)
    assert any(a > b for a, b in zip(fast_table, load))  # (a faster CPU would take more: the guard never does)
    assert ds.guarded_take(P, 8, box, 500.0, load) == load

    counters = {"experts": 100, "compute_s": 0.01}
    sets = []
    step = SimpleNamespace(cpu=SimpleNamespace(stats=lambda: dict(counters), gbps=90.0, overhead_s=18e-6),
                           _retune_mark=(100, 0.01),
                           model=SimpleNamespace(provider=P), K=8, take_load=load, cpu_take=list(load),
                           table=SimpleNamespace(set_cpu_take=sets.append), cpu_retunes=0, cpu_gbps_seen=None)
    counters.update(experts=110, compute_s=0.01 + 10 * P.block_size / 30e9)  # 10 experts: too few, no rate yet
    ds.DeviceStep._cpu_guard(step)
    assert step.cpu_gbps_seen is None and sets == []
    counters.update(experts=140, compute_s=0.01 + 40 * P.block_size / 30e9)  # 40 experts at 30 GB/s
    ds.DeviceStep._cpu_guard(step)
    assert step.cpu_gbps_seen == pytest.approx(30.0) and sets == [slow] and step.cpu_take == slow
    assert step.cpu_retunes == 1
    counters.update(experts=180, compute_s=counters["compute_s"] + 40 * P.block_size / 80e9)  # recovered
    ds.DeviceStep._cpu_guard(step)
    assert step.cpu_take == load and sets[-1] == load and step.cpu_retunes == 2
    monkeypatch.setenv(ds.CPU_RETUNE_ENV, "0")
    assert ds.cpu_retune_steps() == 0
    monkeypatch.delenv(ds.CPU_RETUNE_ENV)
    assert ds.cpu_retune_steps() == 16
    monkeypatch.setenv(ds.CPU_RETUNE_ENV, "often")
    with pytest.raises(ValueError, match="number of steps"):
        ds.cpu_retune_steps()
