#!/usr/bin/env bash
# Session 13, call B: does the RAM tier in transparent huge pages (store/hostmem.py: a private mapping, 2 MiB
# aligned, MADV_HUGEPAGE) speed the CPU experts? The box's THP settings and CPU, then the mailbox alone
# (bench_mailbox.py, 15 threads, 1/2/4 experts a post, alone and beside the GPU's gather) and the offload runs
# (bf16, --vram-gb 4, replayed routing, fresh process each), with the advice and with MADV_NOHUGEPAGE instead
# (this tree patched on the box: 4 KiB pages whatever the box's THP default).
source "$(dirname "$0")/lib.sh"
{ for f in enabled defrag shmem_enabled; do echo "$f: $(cat /sys/kernel/mm/transparent_hugepage/$f)"; done
  lscpu | grep -E "Model name|Socket|NUMA node|Thread|Core|MHz|L3" | cut -c1-160
  grep -E "MemTotal|Hugepagesize|AnonHugePages" /proc/meminfo; } > $OUT/box.txt 2>&1; cat $OUT/box.txt
peers_ckpt; peers_layout layout source source; pack
mb() {
  timeout 150 python3 benchmarks/bench_mailbox.py --layout $W/layout --threads 15 --experts 1,2,4 \
    > $OUT/mailbox-$1.log 2>&1; echo "mailbox $1 rc=$? $(el)"
  tail -1 $OUT/mailbox-$1.log | python3 -c "
import json, sys; d = json.loads(sys.stdin.read()); print('huge GiB', d['anon_huge_gib'], 'gather', d.get('gather_gbps_during'))
for r in d['runs']: print(r['experts'], r['contend'], round(r['gbps'], 1), round(r['overhead_us']))"; pack
}
cp tiered/store/hostmem.py /root/hostmem.thp.py
mb thp
sed -i 's/\[mmap.MADV_HUGEPAGE\] if huge/[mmap.MADV_NOHUGEPAGE] if huge/' tiered/store/hostmem.py
grep -c MADV_NOHUGEPAGE tiered/store/hostmem.py
mb 4k
offload_variant 4k "lru+cpu/device,nextuse+cpu/device"
cp /root/hostmem.thp.py tiered/store/hostmem.py
offload_variant thp "lru+cpu/device,nextuse+cpu/device"
