#!/usr/bin/env bash
# Session 36, call A (not run in session 36: no device was lent; written for the next session): the CUDA tests of
# the grouped kernels (session 35's refactors after its last call: _scale_pair, _pair / _one, _qdot's wrapper
# dropped) and of q4's quantizers; where the VRAM decode step's time goes now (tools/profile_kernels.py, glue on,
# q4+q4 and bf16 of the 8-layer 10.6B shape); what --q4-refine search costs on the GPU against lsq (the whole
# q4+q4 repack of that checkpoint, quantized on CUDA), the figure that decides whether search becomes the default.
source "$(dirname "$0")/lib.sh"
cuda_tests 200 tests/test_quant_grouped.py tests/test_quant_layout.py
peers_ckpt; peers_layout layout-q4 q4 q4; peers_layout layout source source; pack
for r in lsq search; do
  rm -rf $W/layout-q4-$r
  timeout 120 python3 -c "import json; from tiered.layout.repack import repack; print(json.dumps(repack('$W/ckpt', '$W/layout-q4-$r', experts='q4', dense='q4', q4_refine='$r', force=True, progress=False, quant_device='cuda')))" > $OUT/repack-q4-$r.log 2>&1
  echo "repack q4 $r rc=$? $(el)"; tail -1 $OUT/repack-q4-$r.log | cut -c1-300; rm -rf $W/layout-q4-$r
done
pack
for v in layout-q4 layout; do
  timeout 110 python3 tools/profile_kernels.py -m $W/$v --glue on --tokens 16 > $OUT/profile-$v.log 2>&1
  echo "profile $v rc=$? $(el)"; grep -v '^{' $OUT/profile-$v.log | grep -vE "^\[profile" | head -32; pack
done
