#!/usr/bin/env bash
# Session 5, lease calls B2 to F, as they ran (each inline, on the warm box that s5_callB.sh left: /root/lb built,
# /root/peers holding the checkpoint, the bf16 GGUF and the bf16 layout). Call B was cut at its 600 s limit: the
# llama.cpp build took 569 s beside the GGUF conversion, the repacks and the CUDA tests, and the q4 repack had not
# finished. Each block below is one call; `source benchmarks/lease/lib.sh` set OUT to /root/res_*.
set -u
W=/root/peers
P=predicted+4
case "${1:-}" in
B2)  # 615b66d: q4 layout, Q4_0, llama-bench, tiered bf16 and q4 (default tiles), the step-ahead bench
  python3 -c "import json; from tiered.layout.repack import repack; print(json.dumps(repack('$W/ckpt', '$W/layout-q4', experts='q4', dense='q4', force=True, progress=False, quant_device='cuda')))" &
  timeout 100 python3 benchmarks/bench_peers.py --phase model --work $W; wait
  timeout 120 python3 benchmarks/bench_peers.py --phase llama --work $W --llama-only gpu_bf16,gpu_q4_0,cpu_experts_bf16
  for v in bf16 q4; do timeout 75 python3 benchmarks/bench_peers.py --phase tiered --work $W --variant $v --tiered-only vram; done
  python3 benchmarks/bench_peers.py --phase report --work $W --results-dir $OUT
  python3 benchmarks/bench_ahead.py -m $W/layout ;;
C)   # 615b66d: CPU experts under paced links (bf16), then the q4 decode-kernel sweep
  timeout 190 python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/layout --llama-json $W/llama.json \
    --text .carry/shared/text --docs 1 --paced 25,12 \
    --only "all,predicted/off,$P/off,$P/auto,$P/off@12,$P/auto@12,$P/off@25,$P/auto@25"
  python3 benchmarks/bench_quant_kernels.py --formats q4 --max-seconds 70 ;;
D)   # c68f6c4 (TUNED from C's sweep by tools/apply_tuned.py): tiered q4 in VRAM again
  mv $W/tiered-q4.json $W/tiered-q4-default.json
  timeout 120 python3 benchmarks/bench_peers.py --phase tiered --work $W --variant q4 --tiered-only vram
  python3 benchmarks/bench_peers.py --phase report --work $W --results-dir $OUT ;;
E)   # c68f6c4: q4 offload at --vram-gb 4, host and device steps
  python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/layout-q4 --llama-json $W/llama.json --text .carry/shared/text \
    --docs 1 --paced "" --only "lru/off,lru/device,nextuse/device" ;;
F)   # c68f6c4: bf16 offload at --vram-gb 4, host and device steps
  python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/layout --llama-json $W/llama.json --text .carry/shared/text \
    --docs 1 --paced "" --only "lru/off,lru/device,nextuse/device" ;;
*) echo "usage: $0 B2|C|D|E|F (after benchmarks/lease/s5_callB.sh on the same warm box)" >&2; exit 2 ;;
esac
