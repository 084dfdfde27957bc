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
    assert h["s_per_vram_miss"] == pytest.approx((h["miss_s"] - h["ram_s"]) / h["vram_misses"])
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
