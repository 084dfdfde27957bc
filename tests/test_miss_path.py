"""The RAM tier's miss path: a batch's reads (copy mode) and first-use checks (register mode, with a stand-in for
cudaHostRegister) run concurrently on the reader's threads, each block is handed out into the right slot as it
lands, errors still name the file, layer, expert and offset, and the cache's `host` stats count the misses."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from tiered.store.cache import make_provider
from tiered.store.disk import Layout
from tiered.store.hostmem import aligned_empty
from tiered.store.io import BlockReader, ExpertReadError, Faults
from tiered.store.policy import make_policy
from tiered.store.ram import PinnedPool


@pytest.fixture(scope="module")
def layout(reference_layout) -> Layout:
    return Layout.open(reference_layout)


def test_copy_batch_reads_run_concurrently_and_land_in_order_of_arrival(layout):
    """Every read of a batch is submitted before the first block is handed out; a slow first read does not hold
    back the others (completion order); each slot holds its key's bytes."""
    pool = layout.expert_file_pool()
    reader = BlockReader(layout, io="mmap", threads=4, chunk_bytes=layout.block_size)
    submitted: list[int] = []
    plain_chunk, plain_submit = reader._read_chunk, reader.submit
    slow_key = 64 + 3

    def read_chunk(ref, dest, start, n):
        if ref.layer * reader.num_experts + ref.expert == slow_key:
            time.sleep(0.3)
        plain_chunk(ref, dest, start, n)

    def submit(key, dest):
        submitted.append(key)
        return plain_submit(key, dest)

    reader._read_chunk = read_chunk
    reader.submit = submit
    ram = PinnedPool(8, reader, make_policy("lru"), mode="copy")
    keys = [slow_key, 64 + 1, 64 + 2, 7]
    order, at_first_yield = [], None
    for k, s in ram.fetch(keys, 1):
        if at_first_yield is None:
            at_first_yield = list(submitted)
        order.append(k)
        assert torch.equal(ram.host_row(s), pool[k]), k
    assert sorted(order) == sorted(keys) and order[-1] == slow_key  # the slow read came last
    assert at_first_yield == keys  # all four reads were under way before the first hand-out
    assert ram.misses == 4 and ram.bytes_in == 4 * layout.block_size
    ram.table.check()
    ram.close()
    reader.close()


def test_copy_batch_error_names_the_block_and_drops_unfinished_keys(layout):
    reader = BlockReader(layout, io="mmap", threads=4, faults=Faults({(1, 2): "eio"}))
    ram = PinnedPool(8, reader, make_policy("lru"), mode="copy")
    path, off, _, _ = layout.block_offset(1, 2)
    got = []
    with pytest.raises(ExpertReadError) as ei:
        for k, _ in ram.fetch([64 + 1, 64 + 2, 64 + 3], 1):
            got.append(k)
    msg = str(ei.value)
    assert "layer 1 expert 2" in msg and str(off) in msg and str(path) in msg
    assert ram.table.lookup(64 + 2) is None
    for k in got:  # what was handed out stays resident; nothing else does
        assert ram.table.lookup(k) is not None
    assert all(ram.table.lookup(k) is None for k in (64 + 1, 64 + 3) if k not in got)
    ram.table.check()
    ram.close()
    reader.close()


class FakeRegistrar:
    """cudaHostRegister's stand-in: records the calls (and which checks had started by then), touches the pages."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.refuse: set[int] = set()

    def register(self, t: torch.Tensor) -> int:
        self.calls.append(("register", t.data_ptr()))
        int(t[::4096].sum())
        return 700 if t.data_ptr() in self.refuse else 0

    def unregister(self, t: torch.Tensor) -> None:
        self.calls.append(("unregister", t.data_ptr()))


@pytest.fixture
def fake_register(monkeypatch):
    made: list[FakeRegistrar] = []

    def factory():
        r = FakeRegistrar()
        made.append(r)
        return r

    monkeypatch.setattr("tiered.store.ram.HostRegistrar", factory)
    return made


def test_register_batch_checks_run_on_the_reader_threads_before_registration(layout, fake_register):
    """The first-use checks of a whole batch are submitted before the first registration and run off the calling
    thread; blocks are registered in batch order, each after its own check, and map to the right slots."""
    reader = BlockReader(layout, io="mmap", threads=4)
    threads: dict[int, str] = {}
    submitted: list[int] = []
    plain_verify, plain_submit = reader.verify_mapped, reader.submit_mapped_check

    def verify(key):
        threads[key] = threading.current_thread().name
        plain_verify(key)

    def submit(key):
        submitted.append(key)
        return plain_submit(key)

    reader.verify_mapped = verify
    reader.submit_mapped_check = submit
    ram = PinnedPool(6, reader, make_policy("lru"), mode="register")
    reg = fake_register[0]
    keys = [64 + 5, 3, 64 + 9]
    seen_at_first_register = []
    plain_register = reg.register

    def register(t):
        if not seen_at_first_register:
            seen_at_first_register.extend(submitted)
        assert (t.data_ptr() - layout.expert_file_pool().data_ptr()) // layout.block_size in reader._verified
        return plain_register(t)

    reg.register = register
    got = list(ram.fetch(keys, 1))
    assert [k for k, _ in got] == keys
    assert seen_at_first_register == keys  # every check was started before the first registration
    assert all(name.startswith("tiered-io") for name in threads.values()) and set(threads) == set(keys)
    pool = layout.expert_file_pool()
    for k, s in got:
        assert ram.host_row(s).data_ptr() == pool[k].data_ptr()
    assert [c for c, _ in reg.calls] == ["register"] * 3
    assert reader.verified_blocks == 3 and reader.verify_s > 0
    # a hit needs no check; a block evicted for a new one is unregistered (and counted in register_s)
    list(ram.fetch([64 + 5], 2))
    assert threads.keys() == set(keys) and len(reg.calls) == 3
    before = ram.register_s
    more = [20, 21, 22, 23]  # 3 + 4 keys in 6 slots: one eviction (key 3, the least recently used)
    list(ram.fetch(more, 3))
    assert [c for c, _ in reg.calls[3:]].count("unregister") == 1
    assert ("unregister", pool[3].data_ptr()) in reg.calls and ram.table.lookup(3) is None
    assert ram.register_s > before
    ram.close()
    reader.close()


def test_register_batch_check_failure_names_the_block(layout, fake_register):
    reader = BlockReader(layout, io="mmap", threads=4, faults=Faults({(1, 7): "corrupt"}))
    ram = PinnedPool(6, reader, make_policy("lru"), mode="register")
    path, off, _, _ = layout.block_offset(1, 7)
    got = []
    with pytest.raises(ExpertReadError) as ei:
        for k, _ in ram.fetch([64 + 6, 64 + 7, 64 + 8], 1):
            got.append(k)
    msg = str(ei.value)
    assert "layer 1 expert 7" in msg and str(off) in msg and str(path) in msg and "checksum mismatch" in msg
    assert got == [64 + 6]  # registered before the bad block; the bad one and those after it are dropped
    assert ram.table.lookup(64 + 6) is not None
    assert ram.table.lookup(64 + 7) is None and ram.table.lookup(64 + 8) is None
    assert [c for c, _ in fake_register[0].calls] == ["register"]
    ram.table.check()
    ram.close()
    reader.close()


def test_register_refusal_names_the_block(layout, fake_register):
    reader = BlockReader(layout, io="mmap", threads=2)
    ram = PinnedPool(6, reader, make_policy("lru"), mode="register")
    fake_register[0].refuse.add(layout.expert_file_pool()[64 + 2].data_ptr())
    _, off, _, _ = layout.block_offset(1, 2)
    with pytest.raises(RuntimeError, match=f"layer 1 expert 2 .*{off}.*cudaHostRegister refused"):
        list(ram.fetch([64 + 1, 64 + 2], 1))
    assert ram.table.lookup(64 + 2) is None and ram.table.lookup(64 + 1) is not None
    assert ram.register_s >= 0
    ram.close()
    reader.close()


def test_cache_host_stats_count_the_miss_path(layout):
    """stats()["host"]: device misses and RAM-tier misses of decode, the host seconds of the miss path and the
    share blocked in the RAM tier; per-miss figures are their ratios."""
    bs = layout.block_size
    cache = make_provider(layout, device="cpu", quiet=True, expert_slots=8, ram_gb=24 * bs / 2**30 + 1e-9)
    a, b, c, d = ([8 * i + j for j in range(8)] for i in range(4))
    steps = [a, b, a, c, d, a]  # 8 device misses each; a RAM-tier hit at the third and sixth
    for ids in steps:
        cache.get_slots(0, ids)
    h = cache.stats()["host"]
    d = cache.stats()["decode"]
    assert h["vram_misses"] == d["misses"] > 0
    assert h["vram_misses"] == 48 and h["ram_misses"] == cache.ram.misses == 32
    assert 0 < h["ram_s"] <= h["miss_s"]
    assert h["cpu_misses"] == 0  # no --cpu-experts: every device miss is copied
    assert h["s_per_vram_miss"] == pytest.approx((h["miss_s"] - h["ram_s"]) / (h["vram_misses"] - h["cpu_misses"]))
    assert h["s_per_ram_miss"] == pytest.approx(h["ram_s"] / h["ram_misses"])
    assert h["verified_blocks"] == cache.reader.verified_blocks > 0 and h["register_s"] == 0.0
    cache.reset_stats()
    h = cache.stats()["host"]
    assert h["vram_misses"] == h["ram_misses"] == 0 and h["miss_s"] == 0.0 and h["s_per_vram_miss"] is None
    cache.close()


@pytest.mark.parametrize("n_slots,early", [(6, True), (4, True), (3, False)])
def test_first_batch_starts_before_the_hits_when_it_evicts_none_of_them(layout, n_slots, early):
    """With room for the hits and the batch together, the misses' reads are in flight while the hits are handed
    out; without it, the hits go first and the batch may then evict (but never overwrite unread) slots."""
    pool = layout.expert_file_pool()
    reader = BlockReader(layout, io="mmap", threads=2)
    submitted: list[int] = []
    plain = reader.submit

    def submit(key, dest):
        submitted.append(key)
        return plain(key, dest)

    reader.submit = submit
    ram = PinnedPool(n_slots, reader, make_policy("lru"), mode="copy")
    list(ram.fetch([1, 2], 1, pinned=[1, 2]))
    submitted.clear()
    keys = [1, 2, 64 + 3, 64 + 4]
    seen_at_first_hit = None
    for k, s in ram.fetch(keys, 2, pinned=keys):
        if seen_at_first_hit is None:
            assert k == 1
            seen_at_first_hit = list(submitted)
        assert torch.equal(ram.host_row(s), pool[k])
    assert seen_at_first_hit == ([64 + 3, 64 + 4] if early else [])
    assert ram.hits == 2 and ram.misses == 4  # two in the first fetch, two now
    ram.table.check()
    ram.close()
    reader.close()


@pytest.mark.parametrize("io", ["mmap", "direct"])
@pytest.mark.parametrize("n_slots", [1, 3, 5])
def test_more_misses_than_slots_load_in_batches_with_right_bytes(layout, io, n_slots):
    """A fetch of more keys than the tier holds (prefill waves): hits, then batches of at most R misses; each key
    is handed out with its own bytes, before a later batch may reuse its slot."""
    pool = layout.expert_file_pool()
    reader = BlockReader(layout, io=io, threads=3)
    ram = PinnedPool(n_slots, reader, make_policy("lru"), mode="copy")
    list(ram.fetch([5], 1, pinned=[5]))
    keys = [5, 64 + 1, 64 + 2, 9, 64 + 40, 11, 12]
    seen = []
    for k, s in ram.fetch(keys, 2, pinned=keys):
        assert torch.equal(ram.host_row(s), pool[k]), (k, s)
        seen.append(k)
    assert sorted(seen) == sorted(keys) and seen[0] == 5  # the hit first
    ram.table.check()
    ram.close()
    reader.close()


# --- chunked reads: the first-use hash is fed chunk by chunk, in file order, as the chunks land -----------------
CHUNK = 4096  # the reference layout's 16 KiB blocks read as 4 chunks


def _delayed(reader: BlockReader, delays: dict[tuple[int, int], float]) -> list[tuple[int, int]]:
    """Make the read of chunk (key, start) sleep first; returns the list of (key, start) in landing order."""
    plain, landed = reader._read_chunk, []
    E = reader.num_experts

    def read_chunk(ref, dest, start, n):
        time.sleep(delays.get((ref.layer * E + ref.expert, start), 0.0))
        plain(ref, dest, start, n)
        landed.append((ref.layer * E + ref.expert, start))

    reader._read_chunk = read_chunk
    return landed


@pytest.mark.parametrize("io", ["mmap", "direct"])
def test_chunked_reads_out_of_order_verify_and_match_the_layout(layout, io):
    """Chunks landing in any order (the first one last, or shuffled delays over a batch) give the block's bytes and
    pass the first-use check: the hash only ever takes the chunks in file order."""
    pool = layout.expert_file_pool()
    reader = BlockReader(layout, io=io, threads=4, chunk_bytes=CHUNK)
    assert layout.block_size // CHUNK >= 3
    keys = [64 * 2 + e for e in (5, 9, 11, 40)]
    gen = torch.Generator().manual_seed(0)
    delays = {(keys[0], 0): 0.15}  # the first chunk of the first block lands after its other chunks
    for k in keys[1:]:
        for s in range(0, layout.block_size, CHUNK):
            delays[(k, s)] = float(torch.rand((), generator=gen)) * 0.03
    landed = _delayed(reader, delays)
    ram = PinnedPool(8, reader, make_policy("lru"), mode="copy")
    for k, s in ram.fetch(keys, 1):
        assert torch.equal(ram.host_row(s), pool[k]), k
    first = [s for k, s in landed if k == keys[0]]
    assert first[-1] == 0 and sorted(first) == list(range(0, layout.block_size, CHUNK))
    assert reader.verified_blocks == len(keys) and reader.verify_s > 0
    ram.close()
    reader.close()


def test_verified_block_is_not_hashed_again(layout):
    reader = BlockReader(layout, io="mmap", threads=2, chunk_bytes=CHUNK)
    buf = torch.empty(layout.block_size, dtype=torch.uint8)
    reader.read_into(70, buf)
    assert reader.verified_blocks == 1
    v = reader.verify_s
    buf.zero_()
    reader.read_into(70, buf)
    assert reader.verified_blocks == 1 and reader.verify_s == v
    assert torch.equal(buf, layout.expert_file_pool()[70])
    reader.close()


@pytest.mark.parametrize("io", ["mmap", "direct"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_corrupt_chunk_on_disk_names_file_layer_expert_offset(reference_layout, tmp_path, io, where):
    """A flipped byte in the first, a middle or the last chunk of a block on disk: the read raises ExpertReadError
    naming the file, layer, expert and offset, after every chunk of the block has landed; other blocks still read."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(reference_layout, bad)
    lay = Layout.open(bad)
    path, off, size, _ = lay.block_offset(2, 13)
    pos = off + {"first": 10, "middle": size // 2 + 1, "last": size - 3}[where]
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x5A]))
    reader = BlockReader(lay, io=io, threads=3, chunk_bytes=CHUNK)
    landed = _delayed(reader, {(2 * 64 + 13, 0): 0.1})  # the first chunk lands last
    buf, owner = aligned_empty(lay.block_size, pin=False)  # O_DIRECT needs a 4 KiB-aligned buffer
    with pytest.raises(ExpertReadError) as ei:
        reader.read_into(2 * 64 + 13, buf)
    msg = str(ei.value)
    assert "layer 2 expert 13" in msg and str(off) in msg and str(path) in msg and "checksum mismatch" in msg
    assert len([1 for k, _ in landed if k == 2 * 64 + 13]) == size // CHUNK  # no chunk still writing
    reader.read_into(2 * 64 + 12, buf)  # a good block still reads and checks
    assert torch.equal(buf, lay.expert_file_pool()[2 * 64 + 12])
    assert reader.verified_blocks == 1
    reader.close()


def test_failed_chunk_waits_for_the_other_chunks(layout):
    """EIO on one chunk: the block's future raises only after its slower chunks have finished writing."""
    reader = BlockReader(layout, io="mmap", threads=4, chunk_bytes=CHUNK, faults=Faults({(1, 30): "eio"}))
    key = 64 + 30
    plain, finished = reader._read_chunk, []

    def read_chunk(ref, dest, start, n):
        if start:
            time.sleep(0.1)  # the failing chunk 0 reports first
            finished.append(start)
            return
        plain(ref, dest, start, n)

    reader._read_chunk = read_chunk
    fut = reader.submit(key, torch.empty(layout.block_size, dtype=torch.uint8))
    with pytest.raises(ExpertReadError, match="layer 1 expert 30"):
        fut.result(timeout=10)
    assert sorted(finished) == list(range(CHUNK, layout.block_size, CHUNK))
    reader.close()


def test_host_stats_split_blocked_reads_from_host_work(layout):
    """Slow reads land in ram_blocked_s, not in the host work per RAM-tier miss (the simulator's term)."""
    bs = layout.block_size
    cache = make_provider(layout, device="cpu", quiet=True, expert_slots=8, ram_gb=16 * bs / 2**30 + 1e-9)
    plain = cache.reader._read_chunk

    def slow(ref, dest, start, n):
        time.sleep(0.02)
        plain(ref, dest, start, n)

    cache.reader._read_chunk = slow
    for ids in ([0, 1, 2, 3], [4, 5, 6, 7]):
        cache.get_slots(1, ids)
    h = cache.stats()["host"]
    assert h["ram_misses"] == 8
    assert h["ram_blocked_s"] >= 2 * 0.02  # each batch waited at least one slow read
    assert h["work_s_per_ram_miss"] == pytest.approx((h["ram_s"] - h["ram_blocked_s"]) / h["ram_misses"])
    assert 0 <= h["work_s_per_ram_miss"] < h["s_per_ram_miss"]
    assert h["work_s_per_ram_miss"] < 0.02  # the sleeps are not host work
    cache.close()


def test_reader_threads_end_with_close_or_when_the_reader_is_dropped(layout):
    import gc

    buf = torch.empty(layout.block_size, dtype=torch.uint8)
    r = BlockReader(layout, io="mmap", threads=3)
    r.read_into(5, buf)
    threads = list(r._pool._threads)
    assert len(threads) == 3 and all(t.is_alive() for t in threads)
    r.close()
    assert not any(t.is_alive() for t in threads)
    r = BlockReader(layout, io="mmap", threads=3)
    r.read_into(6, buf)
    threads = list(r._pool._threads)
    del r
    gc.collect()
    for t in threads:
        t.join(timeout=5)
    assert not any(t.is_alive() for t in threads)


@pytest.mark.parametrize("mode", ["copy", "register"])
@pytest.mark.parametrize("stop_at", ["hit", "miss"])
def test_caller_stopping_early_leaves_no_key_resident_unread(layout, fake_register, mode, stop_at):
    """The caller closes fetch() after the first hand-out (a hit, while the early batch reads, or a miss): the keys
    handed out stay resident with the right bytes, the others leave the tier with no read still writing."""
    pool = layout.expert_file_pool()
    reader = BlockReader(layout, io="mmap", threads=3, chunk_bytes=CHUNK)
    _delayed(reader, {(64 * 3 + e, 0): 0.05 for e in range(8)})
    ram = PinnedPool(8, reader, make_policy("lru"), mode=mode)
    if stop_at == "hit":
        list(ram.fetch([64 * 3 + 20], 1))
    keys = ([64 * 3 + 20] if stop_at == "hit" else []) + [64 * 3 + e for e in (1, 2, 3)]
    gen = ram.fetch(keys, 2)
    k0, s0 = next(gen)
    gen.close()
    assert ram.table.lookup(k0) == s0 and torch.equal(ram.host_row(s0), pool[k0])
    for k in keys:
        if k != k0:
            assert ram.table.lookup(k) is None, k
    ram.table.check()
    got = {k: s for k, s in ram.fetch(keys, 3)}  # the same keys load again, bytes right
    for k, s in got.items():
        assert torch.equal(ram.host_row(s), pool[k]), k
    ram.close()
    reader.close()


@pytest.mark.cuda
@pytest.mark.parametrize("mode,io", [("copy", "mmap"), ("copy", "direct"), ("register", "mmap")])
def test_cuda_pinned_pool_chunked_reads_copy_the_layout_bytes(layout, mode, io):
    """On CUDA: the pinned staging pool (copy; page-cache or O_DIRECT reads in chunks, hashed as they land) or
    registered mapped blocks, each block copied to the device as it lands on a side stream; the device rows equal
    the layout's blocks, over batches that evict the earlier ones (each eviction waits for its copy)."""
    pool = layout.expert_file_pool()
    reader = BlockReader(layout, io=io, threads=4, chunk_bytes=CHUNK)
    ram = PinnedPool(6, reader, make_policy("lru"), mode=mode, pin=True, cuda=True)
    dev = torch.empty(6, layout.block_size, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    for t, keys in enumerate(([64 * 4 + e for e in range(5)], [64 * 5 + e for e in range(5)], [64 * 4 + 1, 7])):
        got = []
        for k, s in ram.fetch(keys, t + 1):
            with torch.cuda.stream(stream):
                dev[s].copy_(ram.host_row(s), non_blocking=True)
            ram.mark_dma(s, stream)
            got.append((k, s))
        stream.synchronize()
        for k, s in got:
            assert torch.equal(dev[s].cpu(), pool[k]), (mode, io, k)
    assert reader.verified_blocks == 11
    ram.close()
    reader.close()
