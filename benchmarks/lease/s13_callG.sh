#!/usr/bin/env bash
# Session 13, call G: engines loaded one after another in one process (bench_reload.py: lru+cpu/device three times,
# then lru/device, which also prints the slow-link hint's check) with the host buffers' release returning their
# pages (this commit), then with that madvise removed on the box (the pages wait for the garbage collector): RSS,
# MemAvailable and tok/s per run.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout source source; pack
rl() {
  timeout 110 python3 benchmarks/bench_reload.py --layout $W/layout --text .carry/shared/text --runs 3 --new-tokens 64 \
    > $OUT/reload-$1.log 2>&1; echo "reload $1 rc=$? $(el)"
  grep -E '^\{"run"' $OUT/reload-$1.log | python3 -c "
import json, sys
for ln in sys.stdin:
    r = json.loads(ln); print(r['run'], r['label'], round(r['decode_tok_s'] or 0, 1), r['cpu_count'], round(r['cpu_gbps'] or 0, 1), r['take'], 'rss', round(r['rss_gib'], 1), 'avail', round(r['avail_gib'], 1), r['decode_graphs'])"
  grep -E "hint|Error|error" $OUT/reload-$1.log | head -3; pack
}
rl release
cp tiered/store/hostmem.py /root/hostmem.keep.py
python3 - <<'PY'
p = "tiered/store/hostmem.py"; s = open(p).read()
s = s.replace("self.map.madvise(mmap.MADV_DONTNEED)", "pass  # s13 call G: the release without madvise"); open(p, "w").write(s)
PY
grep -c "s13 call G" tiered/store/hostmem.py
rl gc
cp /root/hostmem.keep.py tiered/store/hostmem.py
