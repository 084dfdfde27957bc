"""Data-free q4 refinements compared on fit/ only (the tuning harness behind `--q4-refine`; never run on eval/).

Each variant fake-quantizes olmoe-code-17m's expert matrices (quantize, then back to fp32: the same weights a q4
layout holds, without its kernels) and scores the fp32 checkpoint with `tiered eval` against the bf16 layout on the
fit texts: perplexity ratio, mean KL, top-1 agreement (mean and per file). The fake lsq reproduces the real
`--experts q4` layout's figures (KL 0.00358, top-1 0.95776 on fit/).

    python3 tools/q4_refine_fit.py fit lsq search hqq:0.7:10 hqqs:0.7:10

Variants (MODE[@MATRICES], MATRICES a +-list of name parts, default experts.):
  none | lsq | search        layout/quant.py's rounding from min/max, its lsq refinement, lsq then search
  hqq[:P:BETA]               HQQ (half-quadratic splitting, an Lp error with P < 1, default 0.7) over each group's
                             minimum, the scale fixed, from min/max; errors in units of the scale, the shrink
                             threshold (1 / beta) |e|^(P-1), beta from BETA (default 10) times 1.01 a round, 20 rounds
  hqqs[:P:BETA]              the same from search's result
Measured (session 37, fit/): lsq KL 0.00358 top-1 0.95776; search 0.00325 / 0.9591; hqq:0.7:3 / 10 / 30 0.00364 /
0.00377 / 0.00393 (top-1 0.9581 / 0.9565 / 0.9575); hqqs:0.7:10 0.00326 / 0.9591: HQQ does not improve on lsq or
search here (notes/Q4_DECODE.md, session 37). Session 36's weighted least squares (k-quants' |w|^p weights) was
measured with an earlier copy of this harness: KL 0.00324-0.00344, no better than search.
"""
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
import torch
from safetensors import safe_open
from safetensors.torch import save_file
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tiered.engine import load
from tiered.serve.evaluate import evaluate
from tiered.layout.repack import repack
from tiered.layout import quant as Q
M = Path(__file__).resolve().parent.parent / 'tiered' / 'data' / 'olmoe-code-17m'
TEXT = Path(__file__).resolve().parent.parent.parent / 'shared' / 'text'

def hqq(x, valid, s, m, q, p=0.7, beta=10.0, kappa=1.01, iters=20):
    """HQQ (half-quadratic, Lp with p < 1) over the zero point (the min m), scale fixed; errors in units of s so that
    the shrink threshold is scale free; the last iterate, as HQQ keeps it."""
    v = valid.float(); cnt = v.sum(-1, keepdim=True)
    sf = s.float()[..., None].clamp_min(1e-12); mf = m.float()[..., None]
    for _ in range(iters):
        e = (x - (q * sf + mf)) / sf
        we = torch.sign(e) * torch.relu(e.abs() - (1.0 / beta) * (e.abs() + 1e-12) ** (p - 1))
        mf = ((x - we * sf - q * sf) * v).sum(-1, keepdim=True) / cnt
        mb = mf[..., 0].to(torch.bfloat16)
        q = Q._q4_codes(x, s, mb)
        mf = mb.float()[..., None]
        beta *= kappa
    return s, mf[..., 0].to(torch.bfloat16), q

def fq(w, mode):
    wf = w.float(); g = Q.group_size('q4', wf.shape[-1])
    x = Q._groups(wf, g); valid = Q._groups(torch.ones_like(wf), g) > 0
    big = torch.full_like(x, math.inf)
    lo = torch.where(valid, x, big).amin(-1); hi = torch.where(valid, x, -big).amax(-1)
    m = Q._bf16_down(lo); s = Q._bf16_up((hi - m.float()) / 15.0); q = Q._q4_codes(x, s, m)
    kind = mode
    if kind == 'none':
        pass
    elif kind.startswith('hqq'):  # hqq[:p:beta] from min/max; hqqs: from search's result
        parts = kind.split(':')
        pp = float(parts[1]) if len(parts) > 1 else 0.7
        bb = float(parts[2]) if len(parts) > 2 else 10.0
        if parts[0] == 'hqqs':
            s, m, q = Q._refine_lsq(x, valid, s, m, q)
            s, m, q = Q._refine_search(x, valid, lo, hi, s, m, q)
        s, m, q = hqq(x, valid, s, m, q, p=pp, beta=bb)
    elif kind in ('lsq', 'search'):
        s, m, q = Q._refine_lsq(x, valid, s, m, q)
        if kind == 'search':
            s, m, q = Q._refine_search(x, valid, lo, hi, s, m, q)
    else:
        raise SystemExit(f"unknown variant {mode!r}: none, lsq, search, hqq[:P:BETA] or hqqs[:P:BETA]")
    y = (q * s.float()[..., None] + m.float()[..., None]).flatten(-2)[..., :wf.shape[-1]]
    return y

def make(mode, which, dst):
    dst.mkdir(parents=True)
    for p in M.iterdir():
        if p.suffix != '.safetensors' and p.name != 'model.safetensors.index.json': shutil.copy(p, dst / p.name)
    tensors = {}
    for p in sorted(M.glob('*.safetensors')):
        f = safe_open(p, 'pt')
        for k in f.keys():
            t = f.get_tensor(k)
            if t.dim() == 2 and 'embed' not in k and 'mlp.gate.' not in k and any(r in k for r in which):
                t = fq(t, mode)
            tensors[k] = t.float().contiguous()
    save_file(tensors, dst / 'model.safetensors', metadata={'format': 'pt'})
    cfg = json.loads((dst / 'config.json').read_text()); cfg['dtype'] = 'float32'; cfg['torch_dtype'] = 'float32'
    (dst / 'config.json').write_text(json.dumps(cfg))

def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "fit":
        raise SystemExit("usage: q4_refine_fit.py fit VARIANT [VARIANT ...] (tune on fit/ only)")
    torch.set_num_threads(2)
    texts = {p.name: p.read_text() for p in sorted((TEXT / "fit").glob("*"))}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        repack(M, Path(tmp) / "bf16", progress=False)
        base = load(Path(tmp) / "bf16", device="cpu", dtype="float32", max_context=2048)
        for i, v in enumerate(sys.argv[2:]):
            mode, _, which = v.partition("@")
            ck = Path(tmp) / f"ck{i}"
            make(mode, which.split("+") if which else ["experts."], ck)
            d = Path(tmp) / f"l{i}"
            repack(ck, d, progress=False)
            eng = load(d, device="cpu", dtype="float32", max_context=2048)
            out = evaluate(eng, texts, reference=base)
            print(f"{v:28s}", {k: round(out[k], 5) for k in ("perplexity_ratio", "kl_mean", "top1_agreement")},
                  "top1", [round(f["top1_agreement"], 4) for f in out["files"]], f"{time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
