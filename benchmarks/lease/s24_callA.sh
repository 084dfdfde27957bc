#!/usr/bin/env bash
# Session 24, call A: the kept libraries' A16W4 kernels, measured for the first time (the wheels travel in .whl:
# gemlite 0.6.0.post2 built here with `pip wheel --no-deps`, torchao 0.17.0). Decode: the dense GEMVs of the 10.6B
# shape (lm_head, qkv, o_proj: cuBLAS bf16, our q4 GEMV's default and qlinear, PyTorch's tinygemm on our q4 parts,
# GemLite on our q4 parts, torchao's int4 weight-only), no expert sweep. Prefill: the grouped q4 kernels against
# GemLite's A16W4 GEMM per expert at 16-512 tokens.
source "$(dirname "$0")/lib.sh"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)
for m in ('gemlite', 'torchao'):
    try:
        print(m, __import__(m).__version__)
    except Exception as e:
        print(m, 'import failed:', type(e).__name__, str(e)[:300])" 2>&1 | grep -v Warning | tail -4
timeout 300 python3 benchmarks/bench_quant_kernels.py --formats q4 --shapes none --quick --max-seconds 260 \
  > $OUT/dense.log 2>&1; echo "dense rc=$? $(el)"; grep -E "^dense" $OUT/dense.log | tail -40; pack
timeout 200 python3 benchmarks/bench_quant_kernels.py --phase prefill --prefill-formats q4 --shapes 10.6B \
  --tokens 16,128,512 --max-seconds 150 > $OUT/prefill.log 2>&1; echo "prefill rc=$? $(el)"
grep -iE "gemlite|grouped|gemv" $OUT/prefill.log | grep -v '^{' | tail -20; pack
