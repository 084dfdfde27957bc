"""Session 29: where a sampled batch step's time goes (the embedded model on CUDA, steps ahead): the step medians of
greedy and sampled rows at B = 1 and 8, then torch.profiler over sampled B = 1 steps (host ops by self CPU time,
kernels by CUDA time). Call C's run stopped at the import (the repository was not on the path, fixed since); it was
not run again: the sampler's own timing (bench_sampling.py) showed the host's launches, and call D moved them."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import tiered  # noqa: E402
from tiered.decode.scheduler import Request, SamplingParams, Scheduler  # noqa: E402

e = tiered.load(device="cuda")
ids = e.encode("def fibonacci(n):\n    ")


def job(B, temp, steps=64, prof=None):
    sch = Scheduler(e, max_batch=B, kv_pages=64 * B, page_size=16, prefill_tokens=2048, max_queue=B + 1)
    reqs = [sch.submit(Request(str(i), ids, SamplingParams(max_tokens=steps, stop_at_eos=False, temperature=temp,
                                                           top_p=0.95, seed=i), stream=False)) for i in range(B)]
    while any(not r.out_ids for r in reqs):
        sch.step()
    sch.reset_stats()
    if prof is not None:
        prof.start()
    while not sch.idle():
        sch.step()
    torch.cuda.synchronize()
    if prof is not None:
        prof.stop()
    return sch.stats()["decode_tok_s"]


for B in (1, 8):
    for temp in (0.0, 0.8):
        job(B, temp, 8)
        print(f"B={B} temp={temp}: {job(B, temp):.1f} tok/s", flush=True)
from torch.profiler import ProfilerActivity, profile  # noqa: E402

p = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
job(1, 0.8, 24, p)
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=70))
