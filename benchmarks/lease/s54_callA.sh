#!/usr/bin/env bash
# Session 54, call A (about 260 s after the start; the CUDA tests first). bf16 at --vram-gb 4 (316 slots, the table in
# pinned RAM), five eval documents, replayed routing:
# 1. the cost model's admission penalty (store/offload.py ADMIT_PENALTY 0.25) against 0.5 (TIERED_ADMIT_PENALTY), for
#    the default, lru+cpu/device and nextuse+cpu/device (the demand goal's --policy predicted run). Session 54's
#    lru+cpu/device ran with take [0,1,1,2,2,3,4,4,5] (the mailbox probe's CPU rate high): a lone miss went to the CPU
#    and was not admitted, the hit rate fell to 0.876 on csv.py.txt, and the simulator with that table gives the same
#    0.876 (0.781 of serial Belady over five documents against 0.843 with take[1] = 0). On fit/ at 316 slots the
#    simulator puts 0.5 at or above 0.25 for CPU rates 65-90 GB/s (at 90: 0.843 against 0.829, lru+cpu), but at 250
#    slots 0.5 lost at 90 GB/s (0.820 against 0.867): measure before changing the default.
# 2. the CUDA tests of the graph-pool fix (6e60d37: graph_mem_bytes from capture.pool_bytes; test_attention_decode's
#    capture test failed on -14 MB in session 54).
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
cuda_tests 120 tests/test_attention_decode.py tests/test_capture.py -k "graphs_captured_at_load or pool"
peers_ckpt; peers_layout layout source source; pack
TIMEOUT=150 offload_variant pen25 "default,lru+cpu/device,nextuse+cpu/device" --docs 5
TIMEOUT=150 TIERED_ADMIT_PENALTY=0.5 offload_variant pen50 "default,lru+cpu/device,nextuse+cpu/device" --docs 5
true
