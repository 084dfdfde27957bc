"""The captured step's ends (kernels/step_io.py) against the torch ops they replace: F.embedding and the Rope rows
by index_select, (pos + 1).to(int32), torch.argmax and the position's add.

On CPU through Triton's interpreter: the kernels on small shapes (every value copied or compared, so equal bit for
bit), ties inside and across the pick's blocks, the model's static step and the step-replaying loop with the kernels
against TIERED_STEP_IO=torch, and the kernels compiled for sm_90 in a subprocess. On CUDA (marked): the reference
model's graphed greedy decode with and without them.
"""
from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # the kernels are decorated at import: the interpreter must be on first
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tiered.kernels import step_io  # noqa: E402

interp = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter tests run on CPU")
DEV = "cuda" if CUDA else "cpu"


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D,R", [(33, 8), (64, 64), (100, 6)])
def test_step_inputs_equal_torch(dtype, D, R):
    g = torch.Generator().manual_seed(D + R)
    embed = torch.randn(50, D, generator=g).to(dtype)
    cos, sin = torch.randn(20, R, generator=g).to(dtype), torch.randn(20, R, generator=g).to(dtype)
    for tok, p in ((0, 0), (49, 19), (17, 5)):
        token, pos = torch.tensor([tok]), torch.tensor([p])
        h, c, s, lengths = step_io.step_inputs(token, pos, embed, cos, sin)
        assert torch.equal(h, torch.nn.functional.embedding(token, embed))
        assert torch.equal(c, cos.index_select(0, pos)) and torch.equal(s, sin.index_select(0, pos))
        assert lengths.dtype == torch.int32 and torch.equal(lengths, (pos + 1).to(torch.int32))


@interp
def test_step_inputs_strided_table_rows():
    """A table whose rows are wider than D (a view) is read with its row stride."""
    wide = torch.randn(10, 48)
    embed, cos, sin = wide[:, :40], torch.randn(12, 20)[:, :8], torch.randn(12, 20)[:, 4:12]
    h, c, s, _ = step_io.step_inputs(torch.tensor([7]), torch.tensor([11]), embed, cos, sin)
    assert torch.equal(h[0], embed[7]) and torch.equal(c[0], cos[11]) and torch.equal(s[0], sin[11])


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_pick_equals_argmax(dtype):
    """Random logits over 3 blocks of 64 and a short last block; then planted ties: inside a block, across blocks,
    in the short block; all -inf. The first index of the maximum, as torch.argmax, and pos + 1."""
    V = 3 * 64 + 21
    g = torch.Generator().manual_seed(1)
    cases = [torch.randn(V, generator=g) for _ in range(4)]
    tie = torch.randn(V, generator=g)
    tie[[70, 75, 150, 200]] = 9.0  # block 1 twice, blocks 2 and 3: the first (70) wins
    late = torch.randn(V, generator=g)
    late[[199, 212]] = 5.0  # both in the short last block
    cross = torch.randn(V, generator=g)
    cross[[63, 64]] = 7.0  # the last of block 0 and the first of block 1
    cases += [tie, late, cross, torch.full((V,), float("-inf"))]
    for x in cases:
        logits = x.to(dtype)[None]
        token, pos = torch.tensor([-1]), torch.tensor([41])
        step_io.greedy_pick(logits, token, pos, block=64)
        assert int(token) == int(torch.argmax(logits[0])), x
        assert int(pos) == 42
    token = torch.tensor([-1])
    step_io.greedy_pick(tie[None], token, None, block=64)  # no position to advance
    assert int(token) == 70


@interp
def test_greedy_pick_rows():
    """Three rows at once (the batch graphs' picks): each row's own first maximum, ties across blocks included."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 200, generator=g)
    x[1, [5, 150]] = 8.0
    x[2, [130, 64]] = 6.0
    token = torch.full((3,), -1)
    step_io.greedy_pick(x, token, block=64)
    assert token.tolist() == torch.argmax(x, dim=-1).tolist() == [int(x[0].argmax()), 5, 64]


@interp
def test_rows_inputs_equal_torch():
    """A bucket's buffer (tokens, positions, store places, lengths with a padding row of length 0, a block table of
    5 pages a row, at head 6): the kernel's inputs equal batchgraph's torch ops."""
    g = torch.Generator().manual_seed(5)
    head, mp, bb = 6, 5, 4
    embed = torch.randn(30, 24, generator=g).to(torch.bfloat16)
    cos, sin = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g)
    rows = torch.randint(0, 1000, (head + mp, bb), generator=g)
    rows[0] = torch.tensor([3, 29, 0, 7])
    rows[1] = torch.tensor([10, 39, 0, 2])
    rows[3] = torch.tensor([11, 40, 0, 3])
    ins = step_io.rows_inputs(rows, head, embed, cos, sin)
    assert torch.equal(ins["h"], torch.nn.functional.embedding(rows[0], embed))
    assert torch.equal(ins["cos"], cos.index_select(0, rows[1]))
    assert torch.equal(ins["sin"], sin.index_select(0, rows[1]))
    assert torch.equal(ins["seqlens"], rows[3].to(torch.int32))
    assert torch.equal(ins["bt"], rows[head:].t().to(torch.int32).contiguous())
    assert ins["valid"].dtype == torch.bool and ins["valid"].tolist() == [True, True, False, True]


@interp
def test_greedy_pick_nan_counts_as_largest():
    x = torch.randn(300)
    x[[90, 200]] = float("nan")
    token = torch.tensor([0])
    step_io.greedy_pick(x[None], token, block=64)
    assert int(token) == 90 == int(torch.argmax(x))


def test_greedy_pick_refuses_bad_shapes():
    with pytest.raises(ValueError, match="logits"):
        step_io.greedy_pick(torch.zeros(2, 8, device=DEV), torch.zeros(1, dtype=torch.int64, device=DEV))
    with pytest.raises(ValueError, match="int64"):
        step_io.greedy_pick(torch.zeros(1, 8, device=DEV), torch.zeros(1, dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match="power of two"):
        step_io.greedy_pick(torch.zeros(1, 8, device=DEV), torch.zeros(1, dtype=torch.int64, device=DEV), block=48)


def test_enabled_reads_the_environment(monkeypatch):
    monkeypatch.delenv(step_io.ENV, raising=False)
    assert step_io.enabled()
    monkeypatch.setenv(step_io.ENV, "torch")
    assert not step_io.enabled()
    monkeypatch.setenv(step_io.ENV, "fast")
    with pytest.raises(ValueError, match="TIERED_STEP_IO"):
        step_io.enabled()


@pytest.fixture(scope="module")
def qwen3_layout(tmp_path_factory):
    from conftest import make_checkpoint
    from tiered.layout.repack import repack

    root = tmp_path_factory.mktemp("stepio")
    repack(make_checkpoint(root / "ck", "qwen3_moe", seed=2, norm_topk_prob=True), root / "lay", progress=False)
    return root / "lay"


def _engine(layout, monkeypatch, mode: str, max_context: int = 48):
    import tiered

    monkeypatch.setenv(step_io.ENV, mode)
    return tiered.load(layout, device=DEV, dtype="float32", attn="triton", max_context=max_context, glue=True,
                       cuda_graphs=False)


@interp
def test_static_step_with_kernels_equals_torch_ops(qwen3_layout, monkeypatch):
    """decode_static with the step's inputs from the kernel gives the torch ops' logits bit for bit, and the same
    cache; the model takes the kernel only where asked."""
    runs = {}
    for mode in ("torch", "kernel"):
        m = _engine(qwen3_layout, monkeypatch, mode).model
        assert m._step_io is (mode == "kernel")
        ids = torch.tensor([3, 17, 5, 9, 30, 2])
        with torch.inference_mode():
            m.forward(ids, 0)
            outs = [m.decode_static(torch.tensor([t]), torch.tensor([p]), m.graph_span(p)).clone()
                    for p, t in ((6, 7), (7, 12))]
        runs[mode] = outs, m.cache.k[:, :, :8].clone()
    for a, b in zip(runs["torch"][0], runs["kernel"][0]):
        assert torch.equal(a, b)
    assert torch.equal(runs["torch"][1], runs["kernel"][1])


@interp
def test_replayed_steps_pick_as_torch(qwen3_layout, monkeypatch):
    """GraphedDecode's eager body (what each graph captures): five greedy launches chained through the token and
    position buffers give the same tokens with the kernels' pick as with torch's, and leave pos advanced."""
    from tiered.decode.graphed import GraphedDecode

    toks = {}
    for mode in ("torch", "kernel"):
        m = _engine(qwen3_layout, monkeypatch, mode).model
        gd = GraphedDecode(m, graphs=False)
        assert gd.kernel_pick is (mode == "kernel")
        with torch.inference_mode():
            out = m.forward(torch.tensor([3, 17, 5, 9]), 0)
            gd.start(out[-1:].argmax(-1), 4)
            seq = []
            for p in range(4, 9):
                gd.launch(p)
                seq.append(int(gd.token))
            assert int(gd.pos) == 9
        toks[mode] = seq
    assert toks["torch"] == toks["kernel"]


@interp
def test_batch_graph_body_with_kernels_equals_torch_ops(qwen3_layout, monkeypatch):
    """The batch graphs' body run eagerly (BatchGraphs(graphs=False)), glue on: three requests decoded together give
    the same tokens with the step's ends as kernels and as torch's ops."""
    from tiered.decode.batchgraph import BatchGraphs
    from tiered.decode.scheduler import Request, SamplingParams, Scheduler

    outs = {}
    for mode in ("torch", "kernel"):
        eng = _engine(qwen3_layout, monkeypatch, mode, max_context=64)
        sch = Scheduler(eng, max_batch=3, page_size=8, decode_attention="paged", experts="model")
        sch.graphs = BatchGraphs(sch.step_fn, graphs=False)
        reqs = [sch.submit(Request(str(i), p, SamplingParams(max_tokens=4)))
                for i, p in enumerate([[3, 17, 5], [9, 30, 2, 11, 8], [4, 4]])]
        while not sch.idle():
            sch.step()
        assert sch.graphs.buckets, "no step went through the bucketed body"
        outs[mode] = [r.out_ids for r in reqs]
    assert outs["torch"] == outs["kernel"]


_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tiered.kernels import step_io
tgt = GPUTarget("cuda", 90, 32)

def cubin(fn, sig, cx):
    k = triton.compile(ASTSource(fn, {**sig, "GDC": "constexpr"}, constexprs={**cx, "GDC": True}), target=tgt)
    assert k.asm["cubin"] and "griddepcontrol.wait" in k.asm["ptx"]

for dt in ("bf16", "fp32"):
    sig = {"TOK": "*i64", "POS": "*i64", "EMB": f"*{dt}", "COS": f"*{dt}", "SIN": f"*{dt}", "H": f"*{dt}",
           "C": f"*{dt}", "S": f"*{dt}", "LEN": "*i32", "D": "i32", "R": "i32", "s_e": "i64", "s_c": "i64",
           "s_s": "i64", "BLOCK_D": "constexpr", "BLOCK_R": "constexpr"}
    cubin(step_io._STEP_IN, sig, {"BLOCK_D": 2048, "BLOCK_R": 128})
    sig = {"X": f"*{dt}", "s_x": "i64", "PV": "*fp32", "PI": "*i32", "V": "i32", "P": "i32", "BLOCK": "constexpr"}
    cubin(step_io._PICK_PART, sig, {"BLOCK": step_io.PICK_BLOCK})
    sig = {"ROWS": "*i64", "s_rows": "i64", "head": "i32", "MP": "i32", "EMB": f"*{dt}", "COS": f"*{dt}",
           "SIN": f"*{dt}", "H": f"*{dt}", "C": f"*{dt}", "S": f"*{dt}", "SEQ": "*i32", "BT": "*i32", "VALID": "*i8",
           "D": "i32", "R": "i32", "s_e": "i64", "s_c": "i64", "s_s": "i64", "BLOCK_D": "constexpr",
           "BLOCK_R": "constexpr", "BLOCK_MP": "constexpr"}
    cubin(step_io._ROWS_IN, sig, {"BLOCK_D": 2048, "BLOCK_R": 128, "BLOCK_MP": 256})
    sig = {"TOK": "*i64", "EMB": f"*{dt}", "H": f"*{dt}", "D": "i32", "s_e": "i64", "BLOCK_D": "constexpr"}
    cubin(step_io._EMBED_ROWS, sig, {"BLOCK_D": 2048})
sig = {"PV": "*fp32", "PI": "*i32", "TOK": "*i64", "POS": "*i64", "P": "i32", "BLOCK_P": "constexpr",
       "ADVANCE": "constexpr"}
for adv in (False, True):
    cubin(step_io._PICK, sig, {"BLOCK_P": 64, "ADVANCE": adv})
print("ok")
"""


def test_step_io_kernels_compile_for_sm90():
    from conftest import compile_sm90

    compile_sm90(_COMPILE, timeout=300)


@pytest.mark.cuda
def test_graphed_greedy_decode_with_step_kernels_cuda(monkeypatch):
    """The reference model in bf16 on CUDA, the step replayed from graphs (triton attention): the same greedy tokens
    with the step's ends as kernels and as torch's ops."""
    import tiered

    prompt = list(range(100, 140))
    toks = {}
    for mode in ("torch", "kernel"):
        monkeypatch.setenv(step_io.ENV, mode)
        eng = tiered.load(None, device="cuda", dtype="bfloat16", max_context=256, attn="triton")
        assert eng.model._step_io is (mode == "kernel")
        g = eng.generate(prompt, max_new_tokens=48, stop_at_eos=False)
        assert g.stats["decode_graphs"] == "full"
        toks[mode] = g.token_ids
        del eng
        torch.cuda.empty_cache()
    assert toks["torch"] == toks["kernel"]
