#!/usr/bin/env bash
# Session 41, call D (H100 box): where the greedy tokens of CPU-expert runs leave the lru/off reference run's
# (bench_cpu_experts_gpu's first_divergence), bf16 at --vram-gb 4, one eval document; then (call E, the same warm box)
# `bench_cpu_experts_gpu.py --layout $W/layout --text .carry/shared/text --docs 3 --paced "" --device-fill ""
# --only lru+cpu/device` for three documents.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout source source; pack
TIMEOUT=200 offload_variant div "lru+cpu/device,default"
python3 -c "
import json; d = json.loads(open('$OUT/offload-bf16-div.json').read())
for doc in d['docs']: print(doc['tokens_identical'], json.dumps(doc.get('divergence')))"
pack
