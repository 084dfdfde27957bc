"""The three-tier expert cache on CPU (the device tier is RAM): results never depend on the budget,
the tiers' bookkeeping, O_DIRECT vs mmap bytes, fault injection and budget errors."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tiered.engine import load
from tiered.store.budget import CachePlan, plan_budget
from tiered.store.cache import make_provider
from tiered.store.options import BudgetError, TierConfig
from tiered.store.disk import Layout
from tiered.store.hostmem import aligned_empty
from tiered.store.io import BlockReader, ExpertReadError, Faults
from tiered.store.policy import make_policy

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
NEW = 24


@pytest.fixture(scope="module")
def layout(reference_layout) -> Layout:
    return Layout.open(reference_layout)


@pytest.fixture(scope="module")
def unlimited(reference_layout) -> list[int]:
    """Greedy tokens with every expert resident (ResidentExperts): the reference."""
    return load(reference_layout, device="cpu").generate(PROMPT, max_new_tokens=NEW).token_ids


def cache(layout, faults=None, **flags):
    return make_provider(layout, device="cpu", faults=faults, quiet=True, **flags)


@pytest.mark.parametrize("slots,extra", [
    (8, {}),  # top-k: the smallest valid budget
    (16, {"policy": "lfu"}),  # 2 x top-k
    (128, {"policy": "flru"}),  # 25% of 512 experts
    (256, {"io": "direct"}),  # 50%
    (512, {}),  # 100%
    (16, {"ram_gb": 20 * 49152 / 2**30}),  # a 20-slot pinned RAM tier under the slots (copies)
    (8, {"ram_gb": 3 * 49152 / 2**30, "io": "direct"}),  # RAM tier smaller than a step: batched reads
])
def test_greedy_identical_to_unlimited(reference_layout, unlimited, slots, extra):
    """Greedy output with --expert-slots N equals the run with every expert resident, for any N >= top-k."""
    eng = load(reference_layout, device="cpu", budget={"expert_slots": slots, **extra})
    got = eng.generate(PROMPT, max_new_tokens=NEW).token_ids
    assert got == unlimited, f"slots={slots} {extra}: {got} != {unlimited}"
    s = eng.stats
    assert s["expert_slots"] == slots and s["io"] == ("direct" if extra.get("io") == "direct" else "mmap-staged")
    for tier in ("vram", "ram", "disk"):
        assert {"hits", "misses", "bytes_in", "gbps"} <= set(s[tier])
    d = s["decode"]
    assert d["tokens"] == NEW - 1 and d["hits"] + d["misses"] == (NEW - 1) * 8 * 8  # L=8 layers, K=8
    assert s["bytes_h2d_per_token"] == d["misses"] * 49152 / d["tokens"]
    eng.model.provider.vram.table.check()


def test_long_prompt_smallest_budget_prefill_waves(reference_layout):
    """A prompt longer than one prefill chunk through 8 slots (waves of 8 experts) matches the unlimited run."""
    text = (Path(__file__).resolve().parent.parent.parent / "shared/text/eval").glob("*")
    body = "".join(p.read_text() for p in sorted(text))[:2500] or PROMPT * 40
    ref = load(reference_layout, device="cpu").generate(body, max_new_tokens=6)
    eng = load(reference_layout, device="cpu", budget={"expert_slots": 8})
    got = eng.generate(body, max_new_tokens=6)
    assert ref.stats["tokens_prompt"] > 512  # two prefill chunks
    assert got.token_ids == ref.token_ids
    p = eng.stats["prefill"]
    assert p["misses"] > 8 * 8 * 8  # every layer streamed many waves of 8


def test_direct_and_mmap_bytes_identical(layout):
    """O_DIRECT reads and page-cache reads return the same bytes as the mapping, for every expert."""
    n = layout.config.num_layers * layout.config.num_experts
    pool = layout.expert_file_pool()
    bufs = {}
    for io in ("direct", "mmap"):
        r = BlockReader(layout, io=io, verify="first-use", threads=4)
        buf, owner = aligned_empty(n * layout.block_size, pin=False)
        rows = buf.view(n, layout.block_size)
        futs = [r.submit(k, rows[k]) for k in range(n)]
        for f in futs:
            f.result(timeout=60)
        r.close()
        assert r.bytes_read == n * layout.block_size
        bufs[io] = (rows, owner)
    assert torch.equal(bufs["direct"][0], bufs["mmap"][0])
    assert torch.equal(bufs["direct"][0], pool)


@pytest.mark.parametrize("io,ram", [("direct", None), ("mmap", None), ("direct", 4), ("mmap", 4)])
@pytest.mark.parametrize("kind", ["eio", "short", "corrupt"])
def test_fault_injection_names_the_expert(layout, io, ram, kind):
    """EIO, a short read or a checksum mismatch raise ExpertReadError naming layer, expert, file and offset;
    the cache stays consistent and keeps serving other experts."""
    flags = {"expert_slots": 8, "io": io}
    if ram:
        flags["ram_gb"] = ram * layout.block_size / 2**30
    c = cache(layout, faults=Faults({(3, 17): kind}), **flags)
    c.get(3, torch.tensor([1, 2, 3]))
    t0 = time.perf_counter()
    with pytest.raises(ExpertReadError) as ei:
        c.get(3, torch.tensor([4, 17, 5]))
    assert time.perf_counter() - t0 < 10
    msg = str(ei.value)
    _, off, _, _ = layout.block_offset(3, 17)
    assert "layer 3 expert 17" in msg and "experts.bin" in msg and str(off) in msg
    assert {"eio": "read failed", "short": "short", "corrupt": "checksum mismatch"}[kind] in msg \
        or (io == "mmap" and kind == "short" and "shorter" in msg)
    assert "repack" in msg  # says what to do
    c.vram.table.check()
    assert c.vram.table.lookup(3 * 64 + 17) is None
    slots = c.get(3, torch.tensor([4, 5, 6]))  # the cache still works
    pool = layout.expert_file_pool()
    for e, s in zip([4, 5, 6], slots.tolist()):
        assert torch.equal(c.vram.pool[s], pool[3 * 64 + e])
    c.reader.close()


def test_scripted_counts_match_policy_simulation(layout):
    """The cache's device-tier hits/misses equal a plain simulation of the same policy with the step pinned."""
    seq = [(l, ids) for _ in range(3) for l in range(8) for ids in ([0, 1, 2, 3, 4, 5, 6, 7], [5, 6, 7, 8, 9, 10, 11, 12])]
    for name in ("lru", "lfu", "flru"):
        c = cache(layout, expert_slots=40, policy=name)
        pol = make_policy(name, **({"w": 8.0} if name == "flru" else {}))
        hits = misses = 0
        for t, (l, ids) in enumerate(seq, start=1):
            keys = {l * 64 + e for e in ids}
            for k in sorted(keys):
                if k in pol:
                    hits += 1
                    pol.touch(k, t)
                else:
                    misses += 1
                    if len(pol) >= 40:
                        pol.remove(pol.victim(None, keys))
                    pol.insert(k, t)
            slots = c.get(l, torch.tensor(ids)).tolist()
            assert len(set(slots)) == len(ids)
        assert (c.vram.hits, c.vram.misses) == (hits, misses), name
        c.vram.table.check()


def test_current_step_never_evicted_and_bytes_right(layout):
    """Within a step every returned slot holds its expert's bytes, even with S = top-k and random steps."""
    import random

    rng = random.Random(0)
    c = cache(layout, expert_slots=8, policy="lfu")
    pool = layout.expert_file_pool()
    for _ in range(200):
        l = rng.randrange(8)
        ids = rng.sample(range(64), rng.randint(1, 8))
        slots = c.get(l, torch.tensor(ids)).tolist()
        for e, s in zip(ids, slots):
            assert torch.equal(c.vram.pool[s], pool[l * 64 + e])
    c.vram.table.check()
    with pytest.raises(ValueError, match="waves"):
        c.get(0, torch.arange(9))


def test_prefetch_never_changes_results_and_is_counted(reference_layout, unlimited):
    """Prefetching (even useless experts) keeps greedy output identical; used prefetches are counted."""
    eng = load(reference_layout, device="cpu", budget={"expert_slots": 24})
    prov = eng.model.provider
    real_get = prov.get

    def get_and_prefetch(layer, ids):
        out = real_get(layer, ids)
        nxt = (layer + 1) % 8
        prov.prefetch(nxt, torch.tensor([0, 1, 2, 3, 10, 20, 30, 40]))  # a bad guess on purpose
        return out

    prov.get = get_and_prefetch
    assert eng.generate(PROMPT, max_new_tokens=NEW).token_ids == unlimited
    s = eng.stats
    assert s["prefetch_issued"] > 0 and 0 <= s["prefetch_used"] <= s["prefetch_issued"]
    prov.vram.table.check()


def test_budget_errors_give_numbers(layout):
    """Too small for one layer's top-k, or larger than the GPU: BudgetError with the numbers and a fix."""
    cfg, bs = layout.config, layout.block_size
    cuda = torch.device("cuda")
    kw = dict(dense_bytes=1 << 30, kv_bytes=1 << 28, scratch_bytes=1 << 28, gpu_total=80 << 30, gpu_free=70 << 30)
    with pytest.raises(BudgetError, match=r"--vram-gb 1.4 leaves .* pass --vram-gb"):
        plan_budget(cfg, bs, TierConfig(vram_gb=1.4), device=cuda, **kw)
    with pytest.raises(BudgetError, match="more than this GPU has"):
        plan_budget(cfg, bs, TierConfig(vram_gb=100), device=cuda, **kw)
    with pytest.raises(BudgetError, match="--expert-slots 7 is below one layer's top-k = 8"):
        plan_budget(cfg, bs, TierConfig(expert_slots=7), device=cuda, **kw)
    with pytest.raises(BudgetError, match="holds no expert block"):
        plan_budget(cfg, bs, TierConfig(expert_slots=8, ram_gb=1e-6), device=cuda, **kw)
    p = plan_budget(cfg, bs, TierConfig(vram_gb=1.6, ram_gb=1), device=cuda, **kw)
    assert isinstance(p, CachePlan) and p.expert_slots == min(512, int(1.6 * 2**30 - (1.5 * 2**30)) // bs)
    assert p.ram_slots == 512 and "vram budget 1.60 GiB = dense 1.00" in p.describe()
    with pytest.raises(BudgetError, match="must be one of"):
        TierConfig(policy="random")


def test_cli_corrupt_layout_exits_with_expert(reference_layout, tmp_path):
    """`tiered run` on a layout with a flipped byte stops with exit 1 and names the expert and offset."""
    bad = tmp_path / "bad"
    shutil.copytree(reference_layout, bad)
    lay = Layout.open(bad)
    _, off, _, _ = lay.block_offset(0, 5)
    with open(bad / "experts.bin", "r+b") as f:
        f.seek(off + 100)
        b = f.read(1)
        f.seek(off + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    r = subprocess.run([sys.executable, "-m", "tiered", "run", "-m", str(bad), "--expert-slots", "64",
                        "--max-new-tokens", "4", "--io", "direct", PROMPT * 3], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "layer 0 expert 5" in r.stderr and str(off) in r.stderr and "checksum mismatch" in r.stderr


@pytest.mark.parametrize("io", ["direct", "mmap"])
def test_ram_tier_read_ahead(layout, io):
    """start_load reads ahead without blocking; fetch then serves the right bytes as hits; a failed
    read-ahead raises at the fetch naming the expert; loading slots are never evicted."""
    from tiered.store.ram import PinnedPool

    pool = layout.expert_file_pool()
    reader = BlockReader(layout, io=io, threads=4, faults=Faults({(1, 9): "corrupt"}))
    ram = PinnedPool(4, reader, make_policy("lru"), mode="copy")
    assert ram.start_load(64 + 1, 1) and ram.start_load(64 + 2, 1) and ram.start_load(64 + 3, 1)
    assert not ram.start_load(64 + 1, 1)  # already there
    assert ram.start_load(64 + 4, 1)
    assert not ram.start_load(64 + 5, 1)  # every slot is loading: nothing may be evicted
    got = dict(ram.fetch([64 + 2, 64 + 1], 2))
    assert ram.hits == 2 and ram.misses == 0
    for k, s in got.items():
        assert torch.equal(ram.host_row(s), pool[k])
    ram.settle()
    assert ram.start_load(64 + 9, 3)  # evicts an unpinned, settled key
    with pytest.raises(ExpertReadError, match="layer 1 expert 9.*checksum mismatch"):
        list(ram.fetch([64 + 9], 4))
    assert ram.table.lookup(64 + 9) is None
    ram.table.check()
    ram.close()
    reader.close()


@pytest.mark.cuda
@pytest.mark.parametrize("slots,extra", [
    (8, {"io": "mmap"}),  # registered mapped blocks (or staged where refused)
    (8, {"io": "mmap", "io_register": "off"}),  # staged through pinned copies
    (128, {"io": "direct", "ram_gb": 40 * 49152 / 2**30}),  # O_DIRECT into a RAM tier smaller than the experts
])
def test_cuda_greedy_identical_to_resident(reference_layout, slots, extra):
    """On CUDA (fp32) the cache's greedy tokens equal the all-resident run: copies on the side stream
    are waited for before use, and evicted slots are never overwritten while compute reads them."""
    ref = load(reference_layout, device="cuda", dtype="float32").generate(PROMPT, max_new_tokens=NEW).token_ids
    eng = load(reference_layout, device="cuda", dtype="float32", budget={"expert_slots": slots, **extra})
    prov = eng.model.provider
    real_get = prov.get

    def get_and_prefetch(layer, ids):  # exercise prefetch on the side stream too
        out = real_get(layer, ids)
        prov.prefetch((layer + 1) % 8, torch.tensor([1, 2, 3]))
        return out

    prov.get = get_and_prefetch
    assert eng.generate(PROMPT, max_new_tokens=NEW).token_ids == ref
    s = eng.stats
    assert s["vram"]["misses"] > 0 and s["decode"]["tokens"] == NEW - 1
    if extra.get("io_register") == "off":
        assert s["io"] == "mmap-staged"
    prov.close()


@pytest.mark.cuda
def test_cuda_copy_timer_starts_at_the_first_copy(layout):
    """The device tier's copy time (vram.copy_s, the achieved GB/s) runs from a batch's first copy to its end: host
    work between begin_copies and the first copy_in (the RAM tier finding the block) is not time the link copied.
    A 50 ms host pause there must not show up, and a batch without copies adds no time."""
    from tiered.store.vram import SlotPool

    pool = SlotPool(2, layout.block_size, layout.tensor_specs, make_policy("lru"), device=torch.device("cuda"),
                    max_per_call=2)
    src, owner = aligned_empty(layout.block_size, pin=True)
    try:
        src.fill_(1)
        pool.begin_copies()
        time.sleep(0.05)  # host work before the batch's first copy
        with pool.copy_context():
            pool.copy_in(0, src)
        pool.end_copies()
        pool.harvest_all()
        assert 0 < pool.copy_s < 0.01, pool.copy_s
        assert bool((pool.pool[0] == 1).all())
        before = pool.copy_s
        pool.begin_copies()  # a batch with no copy records no time at all
        pool.end_copies()
        pool.harvest_all()
        assert pool.copy_s == before
    finally:
        owner.release()


def test_host_buffer_huge_pages_and_no_fork_copy():
    """A RAM-tier-sized host buffer starts on a 2 MiB boundary, in a private mapping advised for transparent huge
    pages (the CPU experts stream it; a shared anonymous mapping is shmem, which THP skips) and not copied into a
    forked child. A small one keeps 4 KiB alignment only."""
    import re
    from tiered.store.hostmem import HUGE_PAGE
    buf, owner = aligned_empty(3 * HUGE_PAGE + 4096, pin=False)
    small, small_owner = aligned_empty(8192, pin=False)
    assert buf.data_ptr() % HUGE_PAGE == 0 and buf.numel() == 3 * HUGE_PAGE + 4096
    assert small.data_ptr() % 4096 == 0 and small.numel() == 8192
    buf.fill_(7)
    assert int(buf[-1]) == 7
    a = buf.data_ptr()
    lines = open("/proc/self/smaps").read().splitlines()
    head = next(i for i, ln in enumerate(lines)
                if (m := re.match(r"([0-9a-f]+)-([0-9a-f]+) (\S+)", ln)) and int(m[1], 16) <= a < int(m[2], 16))
    assert lines[head].split()[1].endswith("p"), lines[head]  # private
    fields = {}
    for ln in lines[head + 1:]:
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", ln):
            break
        k, _, v = ln.partition(":")
        fields[k] = v.strip()
    assert "dc" in fields["VmFlags"].split()  # MADV_DONTFORK ("do not copy")
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text():
        assert "hg" in fields["VmFlags"].split() and fields.get("THPeligible") == "1", fields


def test_host_buffer_release_returns_its_pages():
    """owner.release() gives the buffer's pages back at once (a closed RAM tier must not wait for the garbage
    collector while someone still holds the tensor); the tensor then reads zeros. Residency is read per page of the
    buffer from /proc/self/pagemap (bit 63: present): smaps' Rss is per mapping, and the kernel may merge the buffer's
    mapping with a neighbour of the same flags (another test's buffer), whose pages it would count too (a CI run saw
    6 MiB there)."""
    import struct

    buf, owner = aligned_empty(8 << 20, pin=False)
    buf.fill_(3)
    page = 4096

    def resident_pages() -> int:
        a, n = buf.data_ptr(), buf.numel()
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(a // page * 8)
            entries = f.read(n // page * 8)
        return sum(e >> 63 & 1 for (e,) in struct.iter_unpack("<Q", entries))

    assert resident_pages() == (8 << 20) // page
    owner.release()
    assert resident_pages() == 0 and int(buf.sum()) == 0
