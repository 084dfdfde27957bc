"""Where a prefill's host time goes: cProfile over one warm prefill (synchronised at the end), by own time and by
cumulative time, with the host-only time (no sync) and the synchronised time beside it.

    python3 tools/profile_prefill_host.py -m LAYOUT --tokens 512 --top 30

On CUDA the kernels run asynchronously: a prefill whose host-only time is near its synchronised time is bound by the
host, and the table says by what. On CPU every op is synchronous, so the table mixes host and kernel time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    import tiered

    eng = tiered.load(a.model, device=a.device, dtype="bfloat16", max_context=a.tokens + 16)
    cuda = eng.device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(eng.device)) if cuda else (lambda: None)
    ids = torch.randint(10, eng.model.config.vocab_size - 10, (a.tokens,), generator=torch.Generator().manual_seed(0))
    ids = ids.to(eng.device)
    with torch.inference_mode():
        for _ in range(3):
            eng._prefill(ids)
        sync()
        times = []
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            eng._prefill(ids)
            t1 = time.perf_counter()
            sync()
            times.append((t1 - t0, time.perf_counter() - t0))
        pr = cProfile.Profile()
        sync()
        pr.enable()
        eng._prefill(ids)
        sync()
        pr.disable()
    for host, whole in times:
        print(f"prefill {a.tokens} tokens: host {host * 1e3:.2f} ms, synchronised {whole * 1e3:.2f} ms "
              f"({a.tokens / whole:,.0f} tok/s)")
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats(key).print_stats(a.top)
        print(f"\n== by {key}\n" + "\n".join(s.getvalue().splitlines()[4:]))


if __name__ == "__main__":
    main()
