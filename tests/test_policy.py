"""Eviction policies: invariants, exact hit/miss counts on scripted sequences, Belady's optimum."""
from __future__ import annotations

import itertools
import random

import pytest

from tiered.store.policy import (
    LFU,
    LRU,
    FrequencyLRU,
    PolicyInvariantError,
    belady,
    make_policy,
)


def simulate(policy, steps, capacity):
    """Demand paging of `steps` through `capacity` slots with the current step pinned -> (hits, misses)."""
    hits = misses = 0
    for t, step in enumerate(steps):
        keys = set(step)
        for k in sorted(keys):
            if k in policy:
                hits += 1
                policy.touch(k, t)
            else:
                misses += 1
                if len(policy) >= capacity:
                    v = policy.victim(None, keys)
                    assert v not in keys
                    policy.remove(v)
                policy.insert(k, t)
        assert len(policy) <= capacity
    return hits, misses


@pytest.mark.parametrize("name", ["lru", "lfu", "flru"])
def test_invariants_raise(name):
    """Double insert, touch/remove of an absent key, a backwards clock and an all-pinned victim raise."""
    p = make_policy(name)
    p.insert(1, 0)
    with pytest.raises(PolicyInvariantError, match="double insert of key 1"):
        p.insert(1, 1)
    with pytest.raises(PolicyInvariantError, match="touch of key 2"):
        p.touch(2, 1)
    with pytest.raises(PolicyInvariantError, match="remove of key 2"):
        p.remove(2)
    with pytest.raises(PolicyInvariantError, match="backwards"):
        p.touch(1, -1)
    p.insert(2, 2)
    with pytest.raises(PolicyInvariantError, match="no evictable key"):
        p.victim(None, {1, 2})
    assert p.victim(None, {2}) == 1
    assert p.victim([2], set()) == 2  # restricted to the given residents
    p.remove(1)
    assert 1 not in p and len(p) == 1


def test_unknown_policy_names_choices():
    """An unknown policy name lists the known ones."""
    with pytest.raises(ValueError, match="lru"):
        make_policy("random")


def test_lru_scripted():
    """LRU on a scripted sequence: exact victims and counts (pinned current step)."""
    p = LRU()
    steps = [[1, 2], [3], [1], [4], [2], [3, 5]]
    # cap 3: [1,2] m2; [3] m; [1] h; [4] m evict 2 (oldest: 2 at t0, 1 touched t2, 3 at t1);
    # [2] m evict 3; [3,5]: m,m evict 1 then 4 -> hits 1, misses 7
    assert simulate(p, steps, 3) == (1, 7)
    assert set(p._order) == {2, 3, 5}


def test_lfu_scripted():
    """LFU keeps the most used key; ties fall to the least recent."""
    p = LFU()
    steps = [[1], [1], [1], [2], [3], [4], [1], [2]]
    # cap 2: 1 m,h,h; 2 m; 3 m evict 2 (uses 1 vs 3); 4 m evict 3; 1 h; 2 m evict 4 -> hits 3, misses 5
    assert simulate(p, steps, 2) == (3, 5)
    assert set(p._seq) == {1, 2}


def test_flru_interpolates():
    """flru with w=0 behaves as LRU; with a huge w as LFU (same counts on a random sequence)."""
    rng = random.Random(0)
    steps = [[rng.randrange(12) for _ in range(3)] for _ in range(300)]
    assert simulate(FrequencyLRU(w=0), steps, 5) == simulate(LRU(), steps, 5)
    assert simulate(FrequencyLRU(w=1e9), steps, 5) == simulate(LFU(), steps, 5)


def test_pinned_never_evicted_under_pressure():
    """With capacity equal to the step size every step evicts only keys of earlier steps."""
    rng = random.Random(1)
    for name in ("lru", "lfu", "flru"):
        steps = [rng.sample(range(20), 4) for _ in range(200)]
        hits, misses = simulate(make_policy(name), steps, 4)  # simulate() asserts victims unpinned
        assert hits + misses == 800


def brute_belady(steps, capacity):
    """Exhaustive optimum over all eviction choices (tiny inputs only)."""
    best = None

    def go(i, resident, hits):
        nonlocal best
        if i == len(steps):
            best = hits if best is None else max(best, hits)
            return
        keys = set(steps[i])
        h = len(keys & resident)
        missing = keys - resident
        need = len(resident) + len(missing) - capacity
        cands = sorted(resident - keys)
        for ev in itertools.combinations(cands, max(need, 0)):
            go(i + 1, (resident - set(ev)) | keys, hits + h)

    go(0, frozenset(), 0)
    total = sum(len(set(s)) for s in steps)
    return best, total - best


@pytest.mark.parametrize("seed", range(6))
def test_belady_is_optimal(seed):
    """belady() equals an exhaustive search and is never beaten by LRU/LFU/flru."""
    rng = random.Random(seed)
    steps = [rng.sample(range(6), rng.randint(1, 2)) for _ in range(9)]
    cap = 3
    got = belady(steps, cap)
    assert got == brute_belady(steps, cap)
    for name in ("lru", "lfu", "flru"):
        assert simulate(make_policy(name), steps, cap)[0] <= got[0]


def test_belady_scripted():
    """Belady on a scripted sequence: evicts the key used furthest ahead."""
    steps = [[1], [2], [3], [1], [2], [4], [1], [2]]
    # cap 2: 1 m, 2 m, 3 m (evict 2? next uses: 1@3, 2@4 -> evict 2), 1 h, 2 m (evict 3: never),
    # 4 m (evict: 1@6, 2@7 -> evict 2), 1 h, 2 m -> hits 2, misses 6
    assert belady(steps, 2) == (2, 6)
    with pytest.raises(ValueError, match="smaller than the largest step"):
        belady([[1, 2, 3]], 2)


def test_belady_count_from_skips_warmup_steps():
    """count_from counts only the later steps, with the earlier ones still warming the cache."""
    steps = [[1], [2], [1], [2]]
    assert belady(steps, 2) == (2, 2)
    assert belady(steps, 2, count_from=2) == (2, 0)
