"""kernels/l2warm.py: the chunk tables cover exactly the bytes asked for, the mode parses or names its choices, a warm
is a no-op off CUDA, both prefetch kernels compile for sm_90 with their instructions in the PTX, and on CUDA the
warmed decode's greedy tokens equal the unwarmed one's (q4 and bf16)."""
from __future__ import annotations

import pytest
import torch

from tiered.kernels import l2warm
from tiered.kernels.l2warm import L2Warm, chunk_table, warm_mode


def _covered(rows: torch.Tensor) -> set[int]:
    got = set()
    for a, n in rows.tolist():
        got.update(range(a, a + n))
    return got


def test_chunk_table_covers_each_tensor_in_aligned_chunks():
    ts = [torch.zeros(1000, dtype=torch.uint8), torch.zeros(37, dtype=torch.bfloat16), torch.zeros(3, 5)]
    rows = chunk_table(ts, 256)
    assert rows.dtype == torch.int64 and rows.shape[1] == 2
    assert all(a % 16 == 0 and n % 16 == 0 and 0 < n <= 256 for a, n in rows.tolist())
    got = _covered(rows)
    for t in ts:
        lo = t.data_ptr()
        want = set(range(lo, lo + t.numel() * t.element_size()))
        assert want <= got  # every byte, rounded out to 16 at most
    assert len(got) <= sum((t.numel() * t.element_size() + 31) // 16 * 16 for t in ts)


def test_chunk_table_share_and_block_padding():
    a, b = torch.zeros(4096, dtype=torch.uint8), torch.zeros(1024, dtype=torch.uint8)
    rows = chunk_table([a, b], 128, share=0.25, block=8)
    assert rows.shape[0] % 8 == 0
    got = _covered(rows)
    assert set(range(a.data_ptr(), a.data_ptr() + 1024)) <= got  # a quarter of each tensor, its leading bytes
    assert set(range(b.data_ptr(), b.data_ptr() + 256)) <= got
    assert a.data_ptr() + 2048 not in got and b.data_ptr() + 512 not in got
    assert rows[-1].tolist() == rows[-2].tolist()  # padding repeats the last chunk (10 rows -> 16)


def test_chunk_table_refuses_strided_views():
    with pytest.raises(ValueError, match="not contiguous"):
        chunk_table([torch.zeros(4, 4).t()], 128)


def test_warm_mode(monkeypatch):
    monkeypatch.delenv(l2warm.ENV, raising=False)
    assert warm_mode() == "off"
    for v, want in (("1", "lines"), ("bulk", "bulk"), ("LAST", "last"), ("0", "off")):
        monkeypatch.setenv(l2warm.ENV, v)
        assert warm_mode() == want
    monkeypatch.setenv(l2warm.ENV, "sometimes")
    with pytest.raises(ValueError, match="lines, last, bulk"):
        warm_mode()


def test_off_cuda_is_a_no_op():
    w = L2Warm(torch.device("cpu"), "lines")
    assert not w.on
    w.add(1, [torch.zeros(10)])
    w.fork(1)
    w.join()
    assert w.tables == {}
    with pytest.raises(ValueError, match="mode"):
        L2Warm(torch.device("cpu"), "always")


_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tiered.kernels import l2warm as w
tgt = GPUTarget("cuda", 90, 32)
for last in (False, True):
    k = triton.compile(ASTSource(w._WARM_LINES, {"T": "*i64", "BLOCK": "constexpr", "LAST": "constexpr"},
                                 constexprs={"BLOCK": w.LINES, "LAST": last}), target=tgt)
    ptx = k.asm["ptx"]
    assert ("prefetch.global.L2::evict_last" in ptx) == last and "prefetch.global.L2" in ptx, ptx[-2000:]
    assert k.asm["cubin"]
k = triton.compile(ASTSource(w._WARM_BULK, {"T": "*i64", "BLOCK": "constexpr"}, constexprs={"BLOCK": w.BULK_BLOCK}),
                   target=tgt)
assert "cp.async.bulk.prefetch.L2.global" in k.asm["ptx"] and k.asm["cubin"]
k = triton.compile(ASTSource(w._WARM_ROWS, {"T": "*i64", "IDS": "*i64", "BLOCK": "constexpr"},
                             constexprs={"BLOCK": w.LINES}), target=tgt)
assert "prefetch.global.L2" in k.asm["ptx"] and k.asm["cubin"]
print("ok")
"""


def test_kernels_compile_for_sm90():
    from conftest import compile_sm90

    compile_sm90(_COMPILE)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["lines", "last", "bulk"])
def test_cuda_warmed_decode_matches(reference_layout, monkeypatch, mode):
    """The embedded model in bf16 on CUDA graphs: greedy tokens with the warm on equal those with it off."""
    import tiered

    def run(m):
        monkeypatch.setenv(l2warm.ENV, m)
        e = tiered.load(reference_layout, device="cuda", max_context=256)
        assert e.model.l2warm.on == (m != "off") and (m == "off" or len(e.model.l2warm.tables) >= 2)
        return e.generate("def main():", max_new_tokens=60, stop_at_eos=False).token_ids

    assert run(mode) == run("off")


def test_rows_table_on_a_strided_pool(monkeypatch):
    """add_rows over an expert-contiguous pool (rows apart, each contiguous): (row 0's address, the pool's row
    stride, the chunk's offset, its bytes), built without CUDA by forcing the mode on a CPU object."""
    pool = torch.zeros(6, 4096, dtype=torch.uint8)
    part = pool[:, 1024:1024 + 1500]  # [6, 1500], stride 4096
    w = L2Warm(torch.device("cpu"), "lines")
    w.mode, w.device = "lines", torch.device("cpu")
    w.add_rows("down", [part[2:5]])
    t = w.tables["down"].tolist()
    assert t == [[part[2].data_ptr(), 4096, -(part[2].data_ptr() % 16), ((part[2].data_ptr() + 1500 + 15) & ~15)
                  - (part[2].data_ptr() & ~15)]]
    assert w.bytes["down"] >= 1500
    with pytest.raises(ValueError, match="not contiguous"):
        w.add_rows("bad", [pool.view(6, 64, 64).transpose(1, 2)])
