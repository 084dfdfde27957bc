"""--embed host: the token-embedding table in pinned RAM on CUDA, its rows read over PCIe (model/transformer.py
`embed_rows`, kernels/step_io), its GPU memory counted as expert slots (store/cache.py, budget.estimate_dense_bytes);
--embed auto: host only where that buys slots (store/cache.auto_embed_plan).

On CPU: the row gather against F.embedding through Triton's interpreter, the budget's byte count without the table,
the refusals (a lm_head tied to the table; an unpinned host table for a CUDA launch), the option's plumbing (on a
CPU device the table is where the compute is, so the tokens cannot change), and auto's choice from real plans. On
CUDA (marked): the same greedy tokens with the table on the host, on the GPU and where auto puts it, graphs
replayed, and more expert slots under the same --vram-gb.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:  # the kernels are decorated at import: the interpreter must be on first
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tiered.kernels import step_io  # noqa: E402

interp = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter tests run on CPU")


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embed_rows_equal_torch(dtype):
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(50, 40, generator=g).to(dtype)
    tokens = torch.tensor([0, 49, 17, 17, 3])
    for table in (wide.contiguous(), wide[:, :33]):  # whole rows, and rows of a wider table (a row stride)
        assert torch.equal(step_io.embed_rows(tokens, table), F.embedding(tokens, table))
    assert step_io.embed_rows(tokens[:0], wide).shape == (0, 40)


def test_embed_rows_refuses_bad_shapes():
    dev = "cuda" if CUDA else "cpu"
    with pytest.raises(ValueError, match="int64"):
        step_io.embed_rows(torch.zeros(3, dtype=torch.int32, device=dev), torch.zeros(4, 8))


def test_host_table_must_be_pinned_for_a_cuda_launch():
    with pytest.raises(ValueError, match="pinned"):
        step_io._table(torch.zeros(4, 8), torch.device("cuda"))
    t = torch.zeros(4, 8)
    assert step_io._table(t, torch.device("cpu")) is t  # a table on the launch's device passes as it is
    if not CUDA:
        with pytest.raises(ValueError, match="is on cpu"):
            step_io._table(t, torch.device("meta"))


@pytest.fixture(scope="module")
def untied_layout(tmp_path_factory):
    from conftest import make_checkpoint
    from tiered.layout.repack import repack

    root = tmp_path_factory.mktemp("embedhost")
    # a vocabulary of 4,096: a table of several expert blocks, so that moving it buys slots (auto's test)
    ck = make_checkpoint(root / "ck", "qwen3_moe", seed=3, norm_topk_prob=True, tie_word_embeddings=False,
                         vocab_size=4096)
    repack(ck, root / "lay", progress=False)
    return root / "lay"


def test_dense_bytes_without_the_table(untied_layout):
    from tiered.store.disk import Layout
    from tiered.store.budget import estimate_dense_bytes

    lay = Layout.open(untied_layout)
    cfg = lay.config
    full = estimate_dense_bytes(lay, torch.bfloat16)
    assert full - estimate_dense_bytes(lay, torch.bfloat16, ("embed",)) == cfg.vocab_size * cfg.hidden_size * 2


def test_tied_table_refuses_host(reference_layout):
    import tiered
    from tiered.store.options import BudgetError

    with pytest.raises(BudgetError, match="tied"):
        tiered.load(reference_layout, device="cpu", budget={"expert_slots": 64, "embed": "host"})


def test_bad_embed_value_is_refused():
    from tiered.store.options import BudgetError, TierConfig

    with pytest.raises(BudgetError, match="--embed"):
        TierConfig(embed="disk")


def test_cpu_device_keeps_the_table_and_the_tokens(untied_layout):
    """On a CPU device --embed host changes nothing: the table is already in RAM, where the compute is."""
    import tiered

    out = {}
    for place in ("gpu", "host"):
        eng = tiered.load(untied_layout, device="cpu", dtype="float32", budget={"expert_slots": 16, "embed": place})
        assert eng.model.embed.device.type == "cpu"
        g = eng.generate([3, 17, 5, 9], max_new_tokens=8, stop_at_eos=False)
        assert g.stats["embed"] == "device"
        out[place] = g.token_ids
    assert out["gpu"] == out["host"]


@pytest.mark.cuda
def test_host_table_same_tokens_and_more_slots_cuda(untied_layout):
    """bf16 on CUDA under an expert budget, graphs replayed: the table in pinned RAM gives the GPU table's greedy
    tokens (prefill through embed_rows, the steps through step_inputs), and under the same --vram-gb its bytes
    become expert slots."""
    import tiered

    runs = {}
    for place in ("gpu", "host", "auto"):  # auto: every expert fits 0.6 GiB beside the table, so it stays there
        eng = tiered.load(untied_layout, device="cuda", dtype="bfloat16", max_context=128, attn="triton",
                          budget={"vram_gb": 0.6, "embed": place})
        m = eng.model
        assert (m.embed.device.type == "cpu" and m.embed.is_pinned()) if place == "host" else m.embed.is_cuda
        g = eng.generate(list(range(5, 45)), max_new_tokens=32, stop_at_eos=False)
        runs[place] = g.token_ids, g.stats["expert_slots"], g.stats["decode_graphs"]
        assert g.stats["embed"] == ("host" if place == "host" else "device")
        del eng
        torch.cuda.empty_cache()
    assert runs["gpu"][0] == runs["host"][0] == runs["auto"][0]
    assert runs["host"][2] == runs["gpu"][2] != "off"
    assert runs["host"][1] >= runs["gpu"][1]


@pytest.mark.cuda
def test_step_inputs_from_a_pinned_table_cuda():
    g = torch.Generator().manual_seed(1)
    table = torch.randn(300, 256, generator=g).to(torch.bfloat16)
    cos = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
    sin = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
    token, pos = torch.tensor([299], device="cuda"), torch.tensor([7], device="cuda")
    h_dev = step_io.step_inputs(token, pos, table.cuda(), cos, sin)[0]
    h_host = step_io.step_inputs(token, pos, table.pin_memory(), cos, sin)[0]
    assert torch.equal(h_dev, h_host)
    tokens = torch.tensor([0, 299, 5], device="cuda")
    assert torch.equal(step_io.embed_rows(tokens, table.pin_memory()), F.embedding(tokens, table.cuda()))


def test_resolve_embed():
    from tiered.store.cache import resolve_embed

    assert resolve_embed("auto", cuda=True, tied=False, slots_given=False) == "auto"  # left to the slot counts
    for off in ({"cuda": False}, {"tied": True}, {"slots_given": True}):
        assert resolve_embed("auto", **{"cuda": True, "tied": False, "slots_given": False, **off}) == "gpu"
    assert resolve_embed("host", cuda=True, tied=False, slots_given=True) == "host"  # as given
    assert resolve_embed("gpu", cuda=True, tied=False, slots_given=False) == "gpu"


def _auto_plans(lay, vram_gb):
    """--embed auto's choice on a 'cuda' device of 80 GiB free under --vram-gb (plan_budget reads the device's type
    and the memory figures given, so this runs on CPU): (its plan, the place, each side's slots or None, the bytes
    besides the slots with the table on the GPU)."""
    from tiered.store.budget import (GiB, estimate_dense_bytes, estimate_kv_bytes, estimate_scratch_bytes,
                                     plan_budget)
    from tiered.store.cache import auto_embed_plan
    from tiered.store.options import BudgetError, TierConfig

    cfg, dt = lay.config, torch.bfloat16
    tiers = TierConfig(vram_gb=vram_gb, embed="auto")
    kv, scratch = estimate_kv_bytes(cfg, 256, dt), estimate_scratch_bytes(cfg, lay.block_size, dt, 512)

    def plan_for(off):
        return plan_budget(cfg, lay.block_size, tiers, device=torch.device("cuda"),
                           dense_bytes=estimate_dense_bytes(lay, dt, off), kv_bytes=kv, scratch_bytes=scratch,
                           gpu_total=80 * GiB, gpu_free=80 * GiB, ram_total=64 * GiB, ram_avail=64 * GiB)

    sides = {}
    for name, off in (("gpu", ()), ("host", ("embed",))):
        try:
            sides[name] = plan_for(off).expert_slots
        except BudgetError:
            sides[name] = None
    table = estimate_dense_bytes(lay, dt) - estimate_dense_bytes(lay, dt, ("embed",))
    fixed = estimate_dense_bytes(lay, dt) + kv + scratch
    try:
        plan, place = auto_embed_plan(plan_for, num_keys=cfg.num_layers * cfg.num_experts, table_bytes=table)
    except BudgetError as e:
        plan, place = e, None
    return plan, place, sides, fixed


def test_auto_embed_plan_moves_the_table_only_when_it_buys_slots(untied_layout):
    from tiered.store.budget import GiB, estimate_dense_bytes
    from tiered.store.disk import Layout
    from tiered.store.options import BudgetError

    lay = Layout.open(untied_layout)
    cfg, block = lay.config, lay.block_size
    n_all, k = cfg.num_layers * cfg.num_experts, cfg.top_k
    table = estimate_dense_bytes(lay, torch.bfloat16) - estimate_dense_bytes(lay, torch.bfloat16, ("embed",))
    assert table > 4 * block  # the table is worth several slots, or the budgets below could not tell the sides apart
    # every expert fits beside the table: it stays on the GPU (nothing to gain, no row over PCIe)
    plan, place, sides, fixed = _auto_plans(lay, 8.0)
    assert place == "gpu" and plan.expert_slots == sides["gpu"] == n_all
    # a budget that fits half the experts: the table goes to pinned RAM and its bytes become slots
    plan, place, sides, _ = _auto_plans(lay, (fixed + n_all // 2 * block) / GiB)
    assert place == "host" and plan.expert_slots == sides["host"] > sides["gpu"] >= n_all // 2 - 1
    assert sides["host"] >= min(n_all, sides["gpu"] + table // block)
    assert any(n.startswith("--embed auto:") and f"{sides['gpu']} -> {sides['host']}" in n for n in plan.notes)
    # a budget too small with the table on the GPU but enough without it
    plan, place, sides, _ = _auto_plans(lay, (fixed - table + (k + 1) * block) / GiB)
    assert sides["gpu"] is None and place == "host" and plan.expert_slots == sides["host"] >= k
    assert any("too few ->" in n for n in plan.notes)
    # too small either way: the error is the table-on-GPU plan's, which names the budget
    err, place, sides, _ = _auto_plans(lay, (fixed - table) / GiB)
    assert place is None and sides == {"gpu": None, "host": None}
    assert isinstance(err, BudgetError) and "--vram-gb" in str(err)


def test_embed_alone_keeps_experts_resident(untied_layout):
    """--embed is not an expert-cache option: given alone, every expert stays resident, and auto (with every
    expert in memory) keeps the table where the compute is."""
    import tiered
    from tiered.store.resident import ResidentExperts

    for place in ("auto", "gpu"):
        eng = tiered.load(untied_layout, device="cpu", dtype="float32", budget={"embed": place})
        assert isinstance(eng.model.provider, ResidentExperts) and eng.model.embed.device.type == "cpu"


@pytest.mark.cuda
@pytest.mark.parametrize("budget", [{}, {"vram_gb": 0.6}])
def test_host_table_batch_steps_cuda(untied_layout, budget):
    """The batch scheduler's steps with the table in pinned RAM (resident experts: the graphed bucket steps through
    step_io.rows_inputs; under an expert budget: the cache's batch step through Transformer.embed_rows) give the
    same tokens as with the table on the GPU: the rows read are the same bits."""
    import tiered
    from tiered.decode.scheduler import Request, SamplingParams, Scheduler

    prompts = [list(range(5, 5 + n)) for n in (3, 17, 9, 30)]
    lengths = [12, 5, 20, 9]
    outs = {}
    for place in ("gpu", "host"):
        eng = tiered.load(untied_layout, device="cuda", dtype="bfloat16", max_context=128,
                          budget={**budget, "embed": place})
        assert eng.model.embed.is_cuda == (place == "gpu")
        sch = Scheduler(eng, max_batch=4, page_size=16)
        reqs = [sch.submit(Request(str(i), p, SamplingParams(max_tokens=n, stop_at_eos=False)))
                for i, (p, n) in enumerate(zip(prompts, lengths))]
        for _ in range(500):
            if sch.idle():
                break
            sch.step()
        assert sch.idle()
        outs[place] = [r.out_ids for r in reqs]
        assert [len(o) for o in outs[place]] == lengths
        del sch, eng
        torch.cuda.empty_cache()
    assert outs["gpu"] == outs["host"]
