"""The device step's overlapped gather: a layer's misses copy (kernels/slot_table.gather with `landed`) while its
resident experts' gate_up runs beside them; the misses' programs wait for their own rows (kernels/moe_decode
.Landing).

On CPU: the counts (the reference copy and the strided kernel under Triton's interpreter) and the experts' output
with a Landing, bit for bit the output without one. On CUDA (marked): a gather paced to a slow link, then the
experts with the Landing in the same stream (under PDL they start beside the copy; a wait that did not hold would
read the slots' old bytes), and the device step with the overlap against the same step without it.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # the kernels are decorated at import: the interpreter must be on first
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tiered.kernels import slot_table as st  # noqa: E402
from tiered.kernels.moe_decode import DecodeConfig, Landing, gate_up_programs, moe_decode  # noqa: E402
from tiered.kernels.moe_naive import experts_loop  # noqa: E402
from tiered.layout.format import plan_block  # noqa: E402
from tiered.store.disk import expert_views  # noqa: E402

CUDA = torch.cuda.is_available()
interp = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter tests run on CPU")


def _experts(R: int, F: int, D: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """A host pool uint8 [R, block] of R random experts in the layout's block placement, and its specs."""
    specs, bs = plan_block({"gate": ((F, D), str(dtype).removeprefix("torch.")),
                            "up": ((F, D), str(dtype).removeprefix("torch.")),
                            "down": ((D, F), str(dtype).removeprefix("torch."))})
    host = torch.zeros(R, bs, dtype=torch.uint8)
    W = expert_views(host, specs)
    g = torch.Generator().manual_seed(seed)
    for t in (W.gate, W.up, W.down):
        t.copy_((torch.randn(t.shape, generator=g) * D ** -0.5 * 2).to(dtype))
    return host, specs


def test_row_chunks_is_the_gathers_item_count():
    assert st.row_chunks(4096 * 4, 1024, 4) == 1
    assert st.row_chunks(4096 * 4 + 4, 1024, 4) == 2
    assert st.row_chunks(9437184, 1024, 4) == 576  # a bf16 expert of the 10.6B shape, the default copy shape
    assert st.row_chunks(9437184, 256, 2) == 4608


def test_overlap_knob(monkeypatch):
    monkeypatch.delenv(st.GATHER_OVERLAP_ENV, raising=False)
    assert st.gather_overlap_enabled() and st.gather_overlap_mode() == "gate_up"
    for v, mode in (("1", "gate_up"), ("gate_up", "gate_up"), ("down", "down"), ("0", "off")):
        monkeypatch.setenv(st.GATHER_OVERLAP_ENV, v)
        assert st.gather_overlap_mode() == mode and st.gather_overlap_enabled() == (v != "0")
    monkeypatch.setenv(st.GATHER_OVERLAP_ENV, "yes")
    with pytest.raises(ValueError, match="TIERED_GATHER_OVERLAP='yes'"):
        st.gather_overlap_enabled()


def test_reference_gather_counts_landed_rows_and_refuses_bad_counts():
    R, S, B = 5, 4, 4096 * 5
    host = torch.randint(0, 255, (R, B), dtype=torch.uint8)
    slots = torch.zeros(S, B, dtype=torch.uint8)
    src, dst = torch.tensor([-1, 3, 0]), torch.tensor([1, 0, 2])
    landed = torch.zeros(3, dtype=torch.int32)
    st.gather(host, src, dst, slots, landed=landed, block=256, chunks=2)
    assert landed.tolist() == [0, st.row_chunks(B, 256, 2), st.row_chunks(B, 256, 2)]
    assert torch.equal(slots[0], host[3]) and torch.equal(slots[2], host[0]) and slots[1].eq(0).all()
    with pytest.raises(ValueError, match="int32"):
        st.gather(host, src, dst, slots, landed=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="no split"):
        st.gather(host, src, dst, slots, landed=landed, split=(torch.zeros(8, dtype=torch.int64),
                                                                 torch.zeros(3, dtype=torch.int64)))


@interp
@pytest.mark.parametrize("ctas", [1, 3])
def test_strided_kernel_counts_each_copied_chunk(ctas):
    """The interpreter's strided gather raises a copied row's count once per chunk (n_c of them), a hit's never."""
    R, S, B, block, chunks = 6, 4, 4096 * 3 + 512, 256, 2
    host = torch.randint(0, 255, (R, B), dtype=torch.uint8)
    slots = torch.zeros(S, B, dtype=torch.uint8)
    src, dst = torch.tensor([4, -1, 1]), torch.tensor([2, 0, 3])
    landed = torch.zeros(3, dtype=torch.int32)
    words, n_c = B // 4, st.row_chunks(B, block, chunks)
    st._gather_strided_kernel[(ctas,)](host.view(torch.int32), src, dst, slots.view(torch.int32), words, 3 * n_c, n_c,
                                       BLOCK=block, CHUNKS=chunks, spec=src, split_c=src, landed=landed, LAND=True)
    assert landed.tolist() == [n_c, 0, n_c]
    assert torch.equal(slots[2], host[4]) and torch.equal(slots[3], host[1]) and slots[0].eq(0).all()
    landed.zero_()
    st._gather_kernel[(3, n_c)](host.view(torch.int32), src, dst, slots.view(torch.int32), words, BLOCK=block,
                                CHUNKS=chunks, spec=src, split_c=src, landed=landed, LAND=True)
    assert landed.tolist() == [n_c, 0, n_c]


@interp
@pytest.mark.parametrize("ctas,bm", [(1, 8), (3, 16)])
def test_tma_kernel_copies_the_rows_and_counts_each_box(ctas, bm):
    """The TMA gather (a descriptor over the host pool's 128-byte lines, boxes of bm lines) copies the missed rows
    whole, the last box of a row masked (rows of 3 boxes and a bit), touches no other slot, and raises a copied
    row's count once a box (row_chunks' count with tma), a hit's never."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    R, S, B = 6, 4, 128 * (3 * bm + 5)
    host = torch.randint(0, 255, (R, B), dtype=torch.uint8)
    slots = torch.full((S, B), 7, dtype=torch.uint8)
    src, dst = torch.tensor([4, -1, 5]), torch.tensor([2, 0, 3])
    landed = torch.zeros(3, dtype=torch.int32)
    lines, tiles = B // 128, st.row_chunks(B, tma=bm)
    assert tiles == 4
    desc = TensorDescriptor(host.view(torch.int32), [R * lines, 32], [32, 1], [bm, 32])
    st._gather_tma_kernel[(ctas,)](desc, src, dst, slots.view(torch.int32), lines, 3 * tiles, tiles, BM=bm,
                                   landed=landed, LAND=True)
    assert landed.tolist() == [tiles, 0, tiles]
    assert torch.equal(slots[2], host[4]) and torch.equal(slots[3], host[5])
    assert slots[0].eq(7).all() and slots[1].eq(7).all()


def test_tma_shape_knob_and_the_reference_count(monkeypatch):
    """TIERED_GATHER=tma:BM[:warps] selects the TMA gather; the reference gather counts boxes for it."""
    monkeypatch.setenv(st.DEMAND_GATHER_ENV, "tma:128")
    assert st.demand_gather_options() == {"tma": 128, "warps": 4}
    monkeypatch.setenv(st.DEMAND_GATHER_ENV, "tma:64:8")
    assert st.demand_gather_options() == {"tma": 64, "warps": 8}
    assert st.demand_gather_options(paced=True) == {}  # a paced link copies by loads
    for bad in ("tma:100", "tma:512", "tma:x", "tma:64:3", "tma:64:4:1"):
        monkeypatch.setenv(st.DEMAND_GATHER_ENV, bad)
        with pytest.raises(ValueError, match="TIERED_GATHER"):
            st.demand_gather_options()
    assert st.row_chunks(9437184, tma=128) == 576 and st.row_chunks(9437184, tma=256) == 288
    R, S, B = 3, 2, 4096 * 3
    host = torch.randint(0, 255, (R, B), dtype=torch.uint8)
    slots = torch.zeros(S, B, dtype=torch.uint8)
    landed = torch.zeros(2, dtype=torch.int32)
    st.gather(host, torch.tensor([2, -1]), torch.tensor([1, 0]), slots, landed=landed, tma=32)
    assert landed.tolist() == [st.row_chunks(B, tma=32), 0] and torch.equal(slots[1], host[2])


def test_hinted_gather_compiles_for_sm90():
    """The looping gather with each load hint compiles for sm_90 with the hint's PTX (the interpreter has no inline
    PTX); without one, no hint."""
    from conftest import compile_sm90

    compile_sm90("""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tiered.kernels import slot_table as st
sig = {"src": "*i32", "row_src": "*i64", "row_dst": "*i64", "dst": "*i32", "row_words": "i32", "n_items": "i32",
       "n_chunks": "i32", "BLOCK": "constexpr", "CHUNKS": "constexpr", "GDC": "constexpr", "ns_per_chunk": "fp32",
       "R_P": "constexpr", "PACED": "constexpr", "spec": "*i64", "split_c": "*i64", "SPLIT": "constexpr",
       "INVERSE": "constexpr", "landed": "*i32", "LAND": "constexpr", "HINT": "constexpr"}
want = {0: None, 1: "ld.global.L2::256B.v4.b32", 2: "ld.global.nc.L1::no_allocate.L2::256B.v4.b32"}
for hint, asm in want.items():
    c = {"BLOCK": 1024, "CHUNKS": 4, "GDC": True, "R_P": 2, "PACED": False, "SPLIT": False, "INVERSE": False,
         "LAND": True, "HINT": hint}
    k = triton.compile(ASTSource(st._gather_strided_kernel, sig, constexprs=c), target=GPUTarget("cuda", 90, 32))
    ptx = k.asm["ptx"]
    assert k.asm["cubin"] and (asm in ptx if asm else "L2::256B" not in ptx), hint
print("ok")
""")


def test_tma_gather_compiles_for_sm90():
    """The real compiler accepts the TMA gather with its counts and PDL (a tensor-map load and a release add in
    the PTX)."""
    from conftest import compile_sm90

    compile_sm90("""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tiered.kernels import slot_table as st
sig = {"desc": "tensordesc<i32[128, 32]>", "row_src": "*i64", "row_dst": "*i64", "dst": "*i32",
       "lines_per_row": "i32", "n_items": "i32", "tiles_per_row": "i32", "BM": "constexpr", "GDC": "constexpr",
       "landed": "*i32", "LAND": "constexpr"}
k = triton.compile(ASTSource(st._gather_tma_kernel, sig, constexprs={"BM": 128, "GDC": True, "LAND": True}),
                   target=GPUTarget("cuda", 90, 32))
ptx = k.asm["ptx"]
assert k.asm["cubin"] and "cp.async.bulk.tensor" in ptx and "griddepcontrol.wait" in ptx, ptx[:400]
assert "red.global.gpu.release.add" in ptx or "atom.global.gpu.release.add" in ptx, ptx[:400]
print("ok")
""")


@interp
def test_experts_with_a_landing_sum_the_resident_pairs_first():
    """moe_decode with a Landing (the misses' rows counted in) gives the bits of a plain call with the resident
    pairs first (each group in k order), with the waits (copying) or without, and the loop's values: the waits
    change when a program reads, never what. Every gate_up program of every pair is counted done."""
    K, D, F, S = 4, 48, 24, 7
    host, specs = _experts(10, F, D, torch.float32)
    pool = torch.zeros(S, host.shape[1], dtype=torch.uint8)
    pool[[0, 2, 5]] = host[[7, 1, 3]]  # three resident experts; slots 4 and 6 are loaded below
    slots = torch.tensor([2, 4, 0, 6])
    src = torch.tensor([-1, 8, -1, 9])  # pairs 1 and 3 miss: RAM rows 8 and 9
    landed = torch.zeros(K, dtype=torch.int32)
    st.gather(host, src, slots, pool, landed=landed, block=256, chunks=2)
    W = expert_views(pool, specs)
    w = torch.softmax(torch.randn(1, K, generator=torch.Generator().manual_seed(3)), -1)
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(2))
    cfg = DecodeConfig(block_f=8, block_d=16, down_block_d=8, down_block_f=16)
    done = torch.zeros(K, dtype=torch.int32)
    n_c = st.row_chunks(host.shape[1], 256, 2)
    got = moe_decode(x, slots, w, W, cfg, wait=Landing(landed, src, n_c, done))
    assert done.tolist() == [gate_up_programs(F, cfg)] * K
    order = torch.tensor([0, 2, 1, 3])  # the resident pairs, then the missed ones
    want = moe_decode(x, slots[order], w[:, order], W, cfg)
    assert torch.equal(got, want)
    assert torch.equal(moe_decode(x, slots, w, W, cfg, wait=Landing(landed, src, n_c, copying=False)), want)
    done.zero_()  # the device step's default: down waits for gate_up as a whole, no done counts
    assert torch.equal(moe_decode(x, slots, w, W, cfg, wait=Landing(landed, src, n_c, down_waits_per_pair=False)),
                       want)
    assert done.eq(0).all()
    ref = experts_loop(x, slots[None], w, expert_views(pool, specs))
    assert float((got - ref).abs().max()) < 1e-5
    with pytest.raises(NotImplementedError, match="split"):
        moe_decode(x, slots, w, W, DecodeConfig(variant="fused", block_f=8, block_d=16, block_o=16),
                   wait=Landing(landed, src, 1, done))
    with pytest.raises(ValueError, match="int32"):
        moe_decode(x, slots, w, W, cfg, wait=Landing(landed.long(), src, 1, done))
    with pytest.raises(ValueError, match="done None"):  # the waits need the done counts
        moe_decode(x, slots, w, W, cfg, wait=Landing(landed, src, 1))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="CUDA")
@pytest.mark.parametrize("misses", [2, 8])
def test_cuda_experts_wait_for_a_slow_gather(misses):
    """A gather paced to 1 GB/s (9.4 MB experts: about 9 ms each), then the experts with the Landing, in one stream
    as the device step launches them (under PDL, gate_up starts beside the copy and down beside gate_up): the
    output equals the experts' output once everything has landed (the resident pairs first), bit for bit. A wait
    that did not hold would read the missed slots' old bytes (zeros here: checked to give another output), or h
    before gate_up wrote it. Eight misses: every program of gate_up and down waits."""
    K, D, F = 8, 2048, 768
    host, specs = _experts(K + misses, F, D, torch.bfloat16)
    host = host.pin_memory()
    dev = torch.device("cuda")
    pool = torch.zeros(2 * K, host.shape[1], dtype=torch.uint8, device=dev)
    hit = [k for k in range(K) if k % (K // misses) != 1] if misses < K else []
    pool[hit] = host[hit].to(dev)
    slots = torch.tensor([k if k in hit else K + k for k in range(K)], device=dev)
    src = torch.tensor([-1 if k in hit else k for k in range(K)], device=dev)
    assert int((src >= 0).sum()) == misses
    W = expert_views(pool, specs)
    x = torch.randn(1, D, device=dev, dtype=torch.bfloat16)
    w = torch.softmax(torch.randn(1, K, device=dev), -1)
    order = torch.tensor(hit + [k for k in range(K) if k not in hit], device=dev)  # resident pairs first
    stale = moe_decode(x, slots[order], w[:, order], W)  # the missed slots still zero
    landed = torch.zeros(K, dtype=torch.int32, device=dev)
    done = torch.zeros(K, dtype=torch.int32, device=dev)
    st.gather(host, src, slots, pool, gbps=1.0, landed=landed)
    n_c = st.row_chunks(host.shape[1])
    got = moe_decode(x, slots, w, W, wait=Landing(landed, src, n_c, done))
    torch.cuda.synchronize()
    assert landed.tolist() == [0 if k in hit else n_c for k in range(K)]
    assert done.tolist() == [gate_up_programs(F, DecodeConfig.for_shape(D, F))] * K
    want = moe_decode(x, slots[order], w[:, order], W)
    assert torch.equal(got, want)
    assert torch.equal(moe_decode(x, slots, w, W, wait=Landing(landed, src, n_c, copying=False)), want)
    pool[slots[src >= 0]] = 0  # the misses again, down waiting for gate_up as a whole
    landed.zero_()
    st.gather(host, src, slots, pool, gbps=1.0, landed=landed)
    got = moe_decode(x, slots, w, W, wait=Landing(landed, src, n_c, down_waits_per_pair=False))
    assert torch.equal(got, want)
    assert not torch.equal(stale, want)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="CUDA")
def test_cuda_device_step_overlap_matches_the_serial_gather(reference_layout, monkeypatch):
    """The device step (one CUDA graph a token, few slots: most layers miss) with the overlapped gather (gate_up
    beside it, the default, or down beside gate_up too) against TIERED_GATHER_OVERLAP=0: the same greedy tokens
    (the resident pairs are summed first in every mode, so the sums are the same; the kernel tests above check the
    bits)."""
    from tiered.engine import load

    runs = {}
    for knob in ("0", "1", "down"):
        monkeypatch.setenv(st.GATHER_OVERLAP_ENV, knob)
        eng = load(reference_layout, device="cuda",
                   budget={"expert_slots": 16, "ram_gb": 0.05, "slot_table": "device", "cpu_experts": "off"})
        g = eng.generate([5, 9, 13, 2, 7], max_new_tokens=24)
        s = eng.stats
        d = s["device_step"]
        assert s["decode_graphs"] == "device" and d["gather_overlap"] == (knob != "0")
        assert d["down_overlap"] == (knob == "down")
        assert s["decode"]["misses"] > 0
        runs[knob] = g.token_ids
    assert runs["0"] == runs["1"] == runs["down"]


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="CUDA")
@pytest.mark.parametrize("bm", [64, 256])
def test_cuda_tma_gather_lands_rows_for_the_waiting_experts(bm):
    """The gather through TMA boxes (gather's tma) copies pinned rows byte for byte, counts each row's boxes, and the
    experts waiting on those counts (a Landing of row_chunks(tma=bm)) give the output of a plain call once all
    has landed."""
    K, D, F = 8, 2048, 768
    host, specs = _experts(2 * K, F, D, torch.bfloat16)
    host = host.pin_memory()
    dev = torch.device("cuda")
    pool = torch.zeros(2 * K, host.shape[1], dtype=torch.uint8, device=dev)
    hit = [0, 2, 3, 5, 6]
    pool[hit] = host[hit].to(dev)
    slots = torch.tensor([k if k in hit else K + k for k in range(K)], device=dev)
    src = torch.tensor([-1 if k in hit else K + k for k in range(K)], device=dev)
    W = expert_views(pool, specs)
    x = torch.randn(1, D, device=dev, dtype=torch.bfloat16)
    w = torch.softmax(torch.randn(1, K, device=dev), -1)
    landed = torch.zeros(K, dtype=torch.int32, device=dev)
    st.gather(host, src, slots, pool, tma=bm, landed=landed)
    n_c = st.row_chunks(host.shape[1], tma=bm)
    got = moe_decode(x, slots, w, W, wait=Landing(landed, src, n_c, down_waits_per_pair=False))
    torch.cuda.synchronize()
    assert landed.tolist() == [0 if k in hit else n_c for k in range(K)]
    for k in range(K):
        if k not in hit:
            assert torch.equal(pool[K + k].cpu(), host[K + k])
    order = torch.tensor(hit + [k for k in range(K) if k not in hit], device=dev)
    assert torch.equal(got, moe_decode(x, slots[order], w[:, order], W))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="CUDA")
@pytest.mark.parametrize("hint", [1, 2])
def test_cuda_hinted_gather_copies_exact_rows_and_counts(hint):
    """The looping gather with a load hint (16-byte loads by inline PTX) copies pinned rows byte for byte, the last
    item of a row partial (a row of 4 KiB pages, not a multiple of an item), counts each chunk, touches no other
    slot."""
    R, S, B = 6, 4, 4096 * 37
    host = torch.randint(0, 255, (R, B), dtype=torch.uint8).pin_memory()
    dev = torch.device("cuda")
    slots = torch.full((S, B), 7, dtype=torch.uint8, device=dev)
    src, dst = torch.tensor([4, -1, 1], device=dev), torch.tensor([2, 0, 3], device=dev)
    landed = torch.zeros(3, dtype=torch.int32, device=dev)
    st.gather(host, src, dst, slots, hint=hint, landed=landed)
    torch.cuda.synchronize()
    assert landed.tolist() == [st.row_chunks(B), 0, st.row_chunks(B)]
    assert torch.equal(slots[2].cpu(), host[4]) and torch.equal(slots[3].cpu(), host[1])
    assert slots[0].eq(7).all() and slots[1].eq(7).all()


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="CUDA")
def test_cuda_device_step_gather_ways_match_the_default(reference_layout, monkeypatch):
    """The device step with its demand gather through TMA boxes (TIERED_GATHER=tma:BM), or its loads with a hint,
    gives the default's greedy tokens, with the overlap on, and says so in its stats."""
    from tiered.engine import load

    runs = {}
    shapes = {"": None, "tma:32": {"tma": 32, "warps": 4},
              "4:1024:4:nc_256": {"warps": 4, "block": 1024, "chunks": 4, "hint": 2}}
    for knob in shapes:
        monkeypatch.setenv(st.DEMAND_GATHER_ENV, knob)
        eng = load(reference_layout, device="cuda",
                   budget={"expert_slots": 16, "ram_gb": 0.05, "slot_table": "device", "cpu_experts": "off"})
        g = eng.generate([5, 9, 13, 2, 7], max_new_tokens=24)
        s = eng.stats
        assert s["decode_graphs"] == "device" and s["device_step"]["gather_overlap"]
        assert s["decode"]["misses"] > 0
        assert s["slot_table"].get("gather_shape") == shapes[knob]
        runs[knob] = g.token_ids
    assert runs[""] == runs["tma:32"] == runs["4:1024:4:nc_256"]
