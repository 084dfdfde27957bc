#!/usr/bin/env bash
# Session 4, lease call C (after merging fuse, cpux, pf, miss): decode with the fused glue kernels, the fused DeltaNet
# step and the fused shared expert. Qwen3.5 35B-shape decode (llama.cpp's 722 tok/s on the same weights: call B of
# this lease day); the 8-layer 10.6B model in VRAM, bf16 and q4+q4 (llama.cpp Q4_0: s2 lease, same checkpoint); its
# kernel profile with the glue on and off; the device step with next-use eviction at --vram-gb 4; the native CPU
# expert kernel's GB/s with 16 threads. CUDA tests of the new kernels run beside the checkpoint build (untimed).
source "$(dirname "$0")/lib.sh"
W=/root/peers; mkdir -p $W
T0=$(date +%s)
(timeout 150 python3 -m pytest -v -m cuda -p no:cacheprovider --tb=short tests/test_fused_glue.py tests/test_deltanet_step.py \
   tests/test_moe_kernels_model.py > $OUT/cuda-tests.log 2>&1; echo "rc=$?" >> $OUT/cuda-tests.log) &
python3 tools/make_random_checkpoint.py --preset qwen3-10b-8l --out $W/ckpt --seed 0 --device cuda \
  --tokenizer tiered/data/olmoe-code-17m > $OUT/make.log 2>&1; echo "make rc=$? $(( $(date +%s) - T0 )) s"
for v in "layout source source" "layout-q4 q4 q4"; do set -- $v
  python3 -c "import json; from tiered.layout.repack import repack; print(json.dumps(repack('$W/ckpt', '$W/$1', experts='$2', dense='$3', force=True, progress=False, quant_device='cuda')))" > $OUT/repack-$1.log 2>&1
  echo "repack $1 rc=$? $(( $(date +%s) - T0 )) s"
done
rm -rf $W/ckpt
wait
grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests.log | tail -12
pack
timeout 150 python3 benchmarks/bench_qwen35_gpu.py --part decode --skip-hf --work /root/q35 > $OUT/qwen35-decode.log 2>&1
echo "qwen35 rc=$? $(( $(date +%s) - T0 )) s"; grep -E "tok_s|delta_step|fused_step" $OUT/qwen35-decode.log | head; rm -rf /root/q35
pack
for v in bf16 q4; do
  timeout 70 python3 benchmarks/bench_peers.py --phase tiered --work $W --variant $v --tiered-only vram > $OUT/peers-$v.log 2>&1
  echo "peers tiered $v rc=$? $(( $(date +%s) - T0 )) s"; grep -i "decode tok/s" $OUT/peers-$v.log | tail -2
done
cp $W/tiered*.json $OUT/ 2>/dev/null
pack
timeout 60 python3 tools/profile_kernels.py -m $W/layout --tokens 16 --glue both --json > $OUT/profile-bf16.log 2>&1
echo "profile rc=$? $(( $(date +%s) - T0 )) s"; grep -v '^{' $OUT/profile-bf16.log | tail -12
pack
timeout 130 python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/layout --llama-json benchmarks/results/llamacpp-2026-11-30-h200-s2.json \
  --text .carry/shared/text --only "lru/device,nextuse/device,nextuse+pf1/device" --nextuse-prefetch 1 --paced "" --docs 1 > $OUT/offload-bf16.log 2>&1
echo "offload rc=$? $(( $(date +%s) - T0 )) s"; grep -v '^{' $OUT/offload-bf16.log | tail -8
pack
timeout 40 python3 tools/bench_cpu_experts.py --threads 16 --pool-gb 4 --repeats 5 > $OUT/cpu-kernel.log 2>&1
echo "cpu kernel rc=$? $(( $(date +%s) - T0 )) s"; grep -v '^{' $OUT/cpu-kernel.log | tail -10
