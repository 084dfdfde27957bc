#!/usr/bin/env bash
# Session 13, call E: software prefetch in the CPU kernel's dense rows (kernels/cpu_kernel.c PF_BYTES, 0 = none in
# the committed tree), set on the box to 0 / 512 / 1024 / 2048 bytes ahead; the mailbox alone and beside the gather
# (bench_mailbox.py, 15 threads, 1/2/4 experts a post), the kernel rebuilt for each (its cache is keyed by source).
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout source source; pack
mb() {
  timeout 120 python3 benchmarks/bench_mailbox.py --layout $W/layout --threads 15 --experts 1,2,4 --repeats 25 \
    > $OUT/mailbox-$2-pf$1.log 2>&1; echo "mailbox $2 pf$1 rc=$? $(el)"
  tail -1 $OUT/mailbox-$2-pf$1.log | python3 -c "
import json, sys; d = json.loads(sys.stdin.read()); print('gather', d.get('gather_gbps_during'))
for r in d['runs']: print(r['experts'], r['contend'], round(r['gbps'], 1), round(r['overhead_us']))"; pack
}
n=0
for pf in 0 1024 512 2048 0; do
  n=$((n + 1)); sed -i "s/^#define PF_BYTES .*/#define PF_BYTES $pf/" tiered/kernels/cpu_kernel.c; mb $pf $n
done
