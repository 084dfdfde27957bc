#!/usr/bin/env bash
# Written in session 12 for the next lease (not yet run): --cpu-split admit on the GPU. CUDA tests of the mailbox
# (a forced admitted split among them: fp32 tokens identical to the host step), then bf16 at --vram-gb 4 with
# replayed routing, whole experts and the admitted split, each variant in a fresh process (session 12 call I: CPU
# runs late in one process ran 2-3x slower). The simulator (sim_devtable.py --split-admit 0.6, fit/) puts
# nextuse+cpu at 0.831 of serial Belady against 0.759 whole.
source "$(dirname "$0")/lib.sh"
cuda_tests 150 tests/test_cpu_mailbox.py
peers_ckpt; peers_layout layout source source; pack
offload_variant whole "lru+cpu/device,nextuse+cpu/device"
offload_variant admit "lru+cpu:admit/device,nextuse+cpu:admit/device"
