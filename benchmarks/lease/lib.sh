# Sourced by the lease scripts (benchmarks/lease/s4_call*.sh): results go to /root/res_<script> and are packed into
# $OUT/<script>.tgz after each step (`pack`) and on exit, so a call cut by its time limit still brings back what it
# finished; the carried wheels (.whl: fla, gemlite) install under /tmp/site.
# Timing lessons (session 8): the llama.cpp build (tools/build_llamacpp.sh) takes about 240 s alone but 560 s beside
# a repack and CUDA tests, and the CUDA tests of the kernel files take well over 300 s beside a q4 repack (which
# itself went from 100 to 350 s). Run the CUDA tests alone, first, in their own call; build llama.cpp beside
# untimed GPU-only work at most.
set -u
export PYTHONUNBUFFERED=1
# the results' commit: pass TIERED_COMMIT=<sha> in the call's command (the box's git, if any, may name an older commit
# under this tree; tools/benchmeta.git_commit then says "+modified")
[ -n "${TIERED_COMMIT:-}" ] || echo "warning: no TIERED_COMMIT: results take the box's git HEAD (+modified if the tree differs)"
BACK=$OUT; R=/root/res_$(basename "$0" .sh); mkdir -p $R; export OUT=$R
pack() { tar czf $BACK/$(basename "$0" .sh).tgz -C $R . 2>/dev/null; }
trap pack EXIT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site
# Session 7 on: the peers checkpoint (qwen3-10b-8l, seed 0) and its repacks under $W, each made only when absent
# (a warm box keeps them); el prints the seconds since T0.
W=/root/peers; mkdir -p $W
T0=$(date +%s)
el() { echo "$(( $(date +%s) - T0 )) s"; }
peers_ckpt() {
  [ -f $W/ckpt/config.json ] || python3 tools/make_random_checkpoint.py --preset qwen3-10b-8l --out $W/ckpt --seed 0 \
    --device cuda --tokenizer tiered/data/olmoe-code-17m > $OUT/make.log 2>&1; echo "make rc=$? $(el)"
}
cuda_tests() {  # TIMEOUT PYTEST-ARGS...: the CUDA tests named -> $OUT/cuda-tests.log, its summary printed
  local t=$1; shift; box_tests $t -m cuda "$@"
}
box_tests() {  # TIMEOUT PYTEST-ARGS...: pytest on the box as given (without -m cuda, CPU-interpreter tests fail
  # there: no TRITON_INTERPRET) -> $OUT/cuda-tests.log, its summary printed
  local t=$1; shift
  timeout $t python3 -m pytest -q -p no:cacheprovider --tb=short "$@" > $OUT/cuda-tests.log 2>&1
  echo "rc=$?" >> $OUT/cuda-tests.log
  grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests.log | tail -14; echo "tests done $(el)"; pack
}
llama_bg() {  # in the background: llama.cpp's build into /root/lb (BUILD: its pid) and, once the peers checkpoint
  # exists, its bf16 GGUF $W/model-bf16.gguf (CONV: its pid); the caller waits for both
  (JOBS=14 bash tools/build_llamacpp.sh .carry/llama.cpp /root/lb > $OUT/build.log 2>&1; echo "build rc=$?" >> $OUT/build.log) &
  BUILD=$!
  peers_ckpt
  (python3 tools/convert_gguf.py --llama-dir .carry/llama.cpp $W/ckpt --outtype bf16 --outfile $W/model-bf16.gguf.tmp \
     > $W/convert.log 2>&1 && mv $W/model-bf16.gguf.tmp $W/model-bf16.gguf; echo "convert rc=$? $(el)") &
  CONV=$!
}
peers_layout() {  # NAME EXPERTS DENSE: repack $W/ckpt into $W/NAME with --experts EXPERTS --dense DENSE
  [ -f $W/$1/manifest.json ] || python3 -c "import json; from tiered.layout.repack import repack; print(json.dumps(repack('$W/ckpt', '$W/$1', experts='$2', dense='$3', force=True, progress=False, quant_device='cuda')))" > $OUT/repack-$1.log 2>&1
  echo "repack $1 rc=$? $(el)"; sync  # session 12: a fresh repack's dirty pages, written back during the timed runs,
  # slowed the CPU experts (s11 call F: lru+cpu's worker at 26 GB/s against 57 in G, whose layout was already made)
}
peers_layouts() {  # the checkpoint and its q4+q4 (layout-q4) and bf16 (layout) repacks, one after the other
  peers_ckpt; peers_layout layout-q4 q4 q4; peers_layout layout source source; pack
}
peers_vram() {  # VARIANT TAG [VAR=VALUE ...]: tiered's VRAM decode of layout VARIANT (bf16 | q4) under those
  # environment settings -> $OUT/peers-VARIANT-TAG.log and $OUT/tiered-VARIANT-TAG.json
  local v=$1 tag=$2 f=$W/tiered.json; shift 2
  [ $v = bf16 ] || f=$W/tiered-$v.json
  rm -f $f
  env "$@" timeout 100 python3 benchmarks/bench_peers.py --phase tiered --work $W --variant $v --tiered-only vram \
    > $OUT/peers-$v-$tag.log 2>&1
  echo "tiered $v $tag rc=$? $(el)"; grep -iE "decode tok/s" $OUT/peers-$v-$tag.log | grep -v '^{' | tail -1
  cp $f $OUT/tiered-$v-$tag.json 2>/dev/null; pack
}
peers_vram_ctx() {  # CTX VARIANT TAG [VAR=VALUE ...]: peers_vram with tiered's engine loaded at --max-context CTX
  local ctx=$1 v=$2 tag=$3 f=$W/tiered.json; shift 3
  [ $v = bf16 ] || f=$W/tiered-$v.json
  rm -f $f
  env "$@" timeout 100 python3 benchmarks/bench_peers.py --phase tiered --work $W --variant $v --tiered-only vram \
    --max-context $ctx > $OUT/peers-$v-$tag.log 2>&1
  echo "tiered $v $tag (ctx $ctx) rc=$? $(el)"; grep -iE "decode tok/s" $OUT/peers-$v-$tag.log | grep -v '^{' | tail -1
  cp $f $OUT/tiered-$v-$tag.json 2>/dev/null; pack
}
timelines() {  # VARIANT...: tools/profile_kernels.py --timeline on each peers layout (q4 | bf16), 16 tokens ->
  # $OUT/timeline-VARIANT.log, its per-position table printed
  local v lay
  for v in "$@"; do
    lay=layout-q4; [ $v = bf16 ] && lay=layout
    timeout 150 python3 tools/profile_kernels.py -m $W/$lay --tokens 16 --glue on --timeline > $OUT/timeline-$v.log 2>&1
    echo "timeline $v rc=$? $(el)"; grep -B2 -A20 "starts" $OUT/timeline-$v.log | cut -c1-100; pack
  done
}
keep_new() {  # PATH: keep the working tree's PATH as /root/new_<name>, for swap_in new
  cp "$1" /root/new_$(basename "$1")
}
swap_in() {  # PATH VARIANT: PATH becomes the kept copy (VARIANT new) or .carry/old/<stem>_<VARIANT>.py (a commit's)
  local name=$(basename "$1"); if [ "$2" = new ]; then cp /root/new_$name "$1"; else cp .carry/old/${name%.py}_$2.py "$1"; fi
}
attn_benches() {  # TAG: bench_attention under an 800- and a 4,096-position grid -> $OUT/attention-{800,4096}-TAG.json
  python3 benchmarks/bench_attention.py --contexts 528,784 --batches 1 --max-context 800 > $OUT/attn-800-$1.log 2>&1
  cp $OUT/attention.json $OUT/attention-800-$1.json 2>/dev/null
  python3 benchmarks/bench_attention.py --contexts 528,2048,4096 --batches 1,8 --max-context 4096 \
    > $OUT/attn-4096-$1.log 2>&1
  cp $OUT/attention.json $OUT/attention-4096-$1.json 2>/dev/null
  grep -A9 "splits" $OUT/attn-800-$1.log $OUT/attn-4096-$1.log | grep -E "^\S+-\s+[0-9]" | cut -c1-110
}
attn_ab_prelude() {  # VARIANT...: keep the working tree's attention.py (AT), bench_attention under each variant
  # (new: the kept one; a commit: .carry/old's copy), then the peers layouts
  AT=tiered/kernels/attention.py; keep_new $AT
  for v in "$@"; do swap_in $AT $v; attn_benches $v; done
  swap_in $AT new; echo "attention $(el)"; pack
  peers_layouts
}
attn_ab_decodes() {  # OLD: q4+q4 decode with the kept attention.py (new) and commit OLD's, alternating fresh
  # processes twice, at bench_peers' capacity and at 4,096 -> tiered-q4-{new,old}[4k][2].json
  local r
  for r in "" 2; do
    swap_in $AT new; peers_vram q4 new$r; swap_in $AT $1; peers_vram q4 old$r
    swap_in $AT new; peers_vram_ctx 4096 q4 new4k$r; swap_in $AT $1; peers_vram_ctx 4096 q4 old4k$r
  done
  swap_in $AT new
}
decode_table() {  # every $OUT/tiered-*-*.json: its decode tok/s (short and long runs), capture seconds, graph memory
  for f in $OUT/tiered-*-*.json; do python3 -c "
import json; d = json.load(open('$f')); d = d.get('modes', {}).get('vram', d)
print('$f'.split('/')[-1], {k: round(d[k]['decode_tok_s'], 1) for k in ('decode_short', 'decode_long') if k in d},
      'capture_s', d.get('capture_s'), 'graph_mem', d.get('stats_last', {}).get('graph_mem_bytes'))" 2>&1 | tail -1
  done
}
peers_offload() {  # LAYOUT RUNS [ARGS ...]: bench_cpu_experts_gpu.py on $W/LAYOUT (one eval document, native link)
  # with --only RUNS -> $OUT/offload-LAYOUT.log and .json
  local lay=$1 only=$2; shift 2
  timeout 150 python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/$lay --text .carry/shared/text --docs 1 \
    --paced "" --only "$only" "$@" > $OUT/offload-$lay.log 2>&1
  echo "offload $lay rc=$? $(el)"; grep -v '^{' $OUT/offload-$lay.log | grep -E "device|resident" | tail -6
  tail -1 $OUT/offload-$lay.log > $OUT/offload-$lay.json; pack
}
offload_variant() {  # TAG RUNS [ARGS...]: bench_cpu_experts_gpu.py on $W/layout in a fresh process (CPU-expert runs
  # late in one process ran 2-3x slower, session 12 call I) with --only RUNS, unpaced and without the fill unless ARGS
  # say otherwise (TIMEOUT: seconds, default 200; LAYOUT: another layout under $W, e.g. layout-q4) ->
  # $OUT/offload-bf16-TAG.log and .json (offload-LAYOUT-TAG with LAYOUT); prints the runs and the issue's ratios
  local v=$1 only=$2 lay=${LAYOUT:-layout} n=bf16; shift 2
  [ "$lay" = layout ] || n=$lay
  timeout ${TIMEOUT:-200} python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/$lay --text .carry/shared/text \
    --docs 1 --paced "" --device-fill "" --only "$only" "$@" > $OUT/offload-$n-$v.log 2>&1
  echo "offload $n $v rc=$? $(el)"; grep -E "^csv" $OUT/offload-$n-$v.log | tail -12
  tail -1 $OUT/offload-$n-$v.log > $OUT/offload-$n-$v.json; pack
  python3 -c "
import json; d = json.loads(open('$OUT/offload-$n-$v.json').read())
print({k: v for k, v in d.items() if k.startswith(('vs_', 'decode_vs', 'device_cpu', 'paced_', 'best_device_cpu'))
       and v is not None})
for k, r in d['docs'][0]['runs'].items(): print(k, round(r['decode_tok_s'], 1), round(r['hit_rate'], 3), r.get('vs_serial_belady_bound'), r.get('device_cpu'))"
}
llama_batched() {  # after llama_bg's build and GGUF: Q4_0 by llama-quantize (bench_peers.py --phase model), then
  # llama-batched-bench (64-token prompts, 64 new tokens, B = 1, 8, 32, 128, all layers on the GPU) on both GGUFs
  timeout 150 python3 benchmarks/bench_peers.py --phase model --work $W --llama-bin /root/lb/bin > $OUT/model.log 2>&1
  echo "model rc=$? $(el)"; tail -3 $OUT/model.log; cp $W/model.json $OUT/ 2>/dev/null; pack
  local q
  for q in q4_0 bf16; do
    timeout 100 /root/lb/bin/llama-batched-bench -m $W/model-$q.gguf -ngl 99 -c 18432 -b 2048 -ub 512 -npp 64 \
      -ntg 64 -npl 1,8,32,128 --output-format jsonl > $OUT/llama-batched-$q.jsonl 2> $OUT/llama-batched-$q.err
    echo "batched $q rc=$? $(el)"; grep -o '"pl": [0-9]*\|"speed_tg": [0-9.]*' $OUT/llama-batched-$q.jsonl | paste - -
    pack
  done
}
batch_vram() {  # TAG LAYOUT BATCHES PATHS [VAR=VALUE ...]: bench_batch_gpu.py's VRAM phase on $W/LAYOUT, own
  # routing, under those environment settings (SAMPLE=1: every row samples, temperature 0.8, top-p 0.95;
  # BATCH_TIMEOUT: seconds, default 80) -> $OUT/batch-TAG.log and .json
  local tag=$1 lay=$2 bs=$3 paths=$4; shift 4
  rm -f /root/bb-$tag/batch_gpu.json
  env "$@" timeout ${BATCH_TIMEOUT:-80} python3 benchmarks/bench_batch_gpu.py --layout $W/$lay --work /root/bb-$tag \
    --phases vram --batches $bs --paths $paths --routing own --text .carry/shared/text \
    ${SAMPLE:+--temperature 0.8 --top-p 0.95} > $OUT/batch-$tag.log 2>&1
  echo "batch $tag rc=$? $(el)"; grep -E "tok/s" $OUT/batch-$tag.log | cut -c1-200 | tail -8
  cp /root/bb-$tag/batch_gpu.json $OUT/batch-$tag.json 2>/dev/null; pack
}
run_q4() {  # TAG LAYOUT ARGS...: `tiered run` on $W/LAYOUT, 256 new tokens -> $OUT/run-TAG.{out,err}, prints decode_tok_s
  local tag=$1 lay=$2; shift 2
  timeout 60 python3 -m tiered run -m $W/$lay --device cuda --max-new-tokens 256 --json "$@" "def fibonacci(n):" \
    > $OUT/run-$tag.out 2> $OUT/run-$tag.err
  echo "run $tag rc=$? $(el) $(tail -1 $OUT/run-$tag.err | python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print(d["decode_tok_s"], d["tokens_generated"], d["step_ahead"], d["capture_in_call_s"])' 2>&1 | tail -1)"
  pack
}
gptoss_llama_bg() {  # G: llama.cpp's build (10 jobs; BUILD: its pid) now; gptoss_gguf_bg once $G/ck exists
  (JOBS=10 bash tools/build_llamacpp.sh .carry/llama.cpp /root/lb > $OUT/build.log 2>&1; echo "build rc=$?" >> $OUT/build.log) &
  BUILD=$!
}
gptoss_gguf_bg() {  # G: the bf16 GGUF of the gpt-oss checkpoint $G/ck, in the background (CONV: its pid)
  (python3 tools/convert_gguf.py --llama-dir .carry/llama.cpp $1/ck --outtype bf16 --outfile $1/model-bf16.gguf.tmp \
    > $OUT/convert.log 2>&1 && mv $1/model-bf16.gguf.tmp $1/model-bf16.gguf; echo "convert rc=$? $(el)") &
  CONV=$!
}
gptoss_llama_prompts() {  # G NPL: after both, Q4_0 (unless there), llama-bench pp512 / pp2048 and llama-batched-bench
  # (64-token prompts, 16 new, B in NPL) on the bf16 and Q4_0 GGUFs of $G
  local G=$1 npl=$2 q
  wait $CONV; wait $BUILD; echo "build $(tail -1 $OUT/build.log) $(el)"; pack
  [ -f $G/model-Q4_0.gguf ] || timeout 100 /root/lb/bin/llama-quantize $G/model-bf16.gguf $G/model-Q4_0.gguf Q4_0 16 \
    > $OUT/quantize.log 2>&1
  echo "quantize rc=$? $(el)"
  for q in bf16 Q4_0; do
    timeout 80 /root/lb/bin/llama-bench -m $G/model-$q.gguf -ngl 99 -p 512,2048 -n 0 -r 3 -o json \
      > $OUT/llama-bench-$q.json 2> $OUT/llama-bench-$q.err
    echo "bench $q rc=$? $(el)"; python3 -c "
import json; [print(r['n_prompt'], r['n_gen'], round(r['avg_ts'], 1)) for r in json.load(open('$OUT/llama-bench-$q.json'))]"
    timeout 60 /root/lb/bin/llama-batched-bench -m $G/model-$q.gguf -ngl 99 -c 8192 -b 2048 -ub 512 -npp 64 \
      -ntg 16 -npl $npl --output-format jsonl > $OUT/llama-batched-$q.jsonl 2> $OUT/llama-batched-$q.err
    echo "batched $q rc=$? $(el)"; grep -o '"pl": [0-9]*\|"speed_pp": [0-9.]*\|"speed_tg": [0-9.]*' \
      $OUT/llama-batched-$q.jsonl | paste - - -
    pack
  done
}
baseline_same_run() {  # issue 13's same-run baseline: llama.cpp built here (llama_bg) beside the two peers layouts,
  # Q4_0 by llama-quantize (bench_peers --phase model), then tiered's VRAM decode (q4+q4, bf16) before and after
  # llama-bench tg128 / pp512 on the bf16 and Q4_0 GGUFs; bench_peers --phase report writes the ratios. Needs
  # .carry/llama.cpp (tools/fetch_llamacpp.sh) in the call's carry.
  llama_bg
  peers_layout layout-q4 q4 q4
  peers_layout layout source source
  wait $CONV; wait $BUILD; grep -E "built|rc=" $OUT/build.log | tail -2; echo "build done $(el)"; pack
  timeout 120 python3 benchmarks/bench_peers.py --phase model --work $W --llama-bin /root/lb/bin > $OUT/model.log 2>&1
  echo "model rc=$? $(el)"; tail -3 $OUT/model.log; cp $W/model.json $OUT/ 2>/dev/null; pack
  peers_vram q4 a
  peers_vram bf16 a
  timeout 120 python3 benchmarks/bench_peers.py --phase llama --work $W --llama-bin /root/lb/bin \
    --llama-only gpu_bf16,gpu_q4_0 > $OUT/llama.log 2>&1
  echo "llama rc=$? $(el)"; tail -4 $OUT/llama.log; cp $W/llama.json $OUT/ 2>/dev/null; pack
  peers_vram q4 b
  peers_vram bf16 b
  decode_table
  timeout 60 python3 benchmarks/bench_peers.py --phase report --work $W --results-dir $OUT > $OUT/report.log 2>&1
  echo "report rc=$? $(el)"; grep -v '^{' $OUT/report.log | tail -25; pack
}
timeline_with() {  # TAG TIMEOUT [VAR=VALUE ...]: tools/profile_kernels.py --timeline on the q4+q4 peers layout under
  # those environment settings, 16 tokens -> $OUT/timeline-TAG.log, its step and first rows printed
  local tag=$1 t=$2; shift 2
  timeout $t env "$@" python3 tools/profile_kernels.py -m $W/layout-q4 --tokens 16 --glue on \
    --timeline > $OUT/timeline-$tag.log 2>&1
  echo "timeline rc=$? $(el)"; grep -E "graphed step|replayed:" $OUT/timeline-$tag.log
  grep -A13 "starts" $OUT/timeline-$tag.log | cut -c1-100; pack
}
q4_ab() {  # VAR: the q4+q4 VRAM decode with VAR=0 and VAR=1, alternating fresh processes twice (tags off, on as
  # fold: off / fold / off2 / fold2), then the decode table
  peers_vram q4 off $1=0; peers_vram q4 fold $1=1; peers_vram q4 off2 $1=0; peers_vram q4 fold2 $1=1; decode_table
}
gluon_lm() {  # TIMEOUT: tools/gluon_q4_probe.py at the lm_head (sessions 44-45's best Gluon variants against TUNED's
  # word tile) -> $OUT/gluon-probe.log; GL: the fastest variant's TIERED_QCONFIG entry when its PDL launch beat
  # TUNED's by 3% or more, else empty
  timeout $1 python3 tools/gluon_q4_probe.py --gpu --bn 64,128 --persist 0 --ahead 2,4 --groups 2,4 \
    --only lm_head > $OUT/gluon-probe.log 2>&1
  echo "gluon probe rc=$? $(el)"; grep -E "TUNED|rel err|best" $OUT/gluon-probe.log | tail -12; pack
  GL=$(python3 - <<PY 2>/dev/null
import json
rows = [json.loads(l.split(" ", 1)[1]) for l in open("$OUT/gluon-probe.log") if l.startswith("lm_head {")]
r = rows[-1] if rows else {}
best = min(((v["us_pdl"], k) for k, v in r.items() if isinstance(v, dict) and v.get("us_pdl")), default=None)
if best and best[0] < 0.97 * r["tuned_pdl_us"]:
    bn, _, a, g = best[1].split("_")
    print(f"gemv,q4,2048,151936:bn={bn[2:]},algo=3,ahead={a[1:]},bg={g[1:]}")
PY
)
  echo "lm_head entry: ${GL:-none (TUNED kept)}"
}
box_topology() {  # the box's CPUs -> $OUT/lscpu.txt, nodes.txt, topology.txt (CPU, core, siblings); prints the
  # physical cores and the CPUs TIERED_CPU_PIN=1 would pin (store/offload.worker_cpus), and the nodes' CPUs
  lscpu > $OUT/lscpu.txt 2>&1; cat /sys/devices/system/node/node*/cpulist > $OUT/nodes.txt 2>&1
  local c
  for c in /sys/devices/system/cpu/cpu[0-9]*; do
    echo "$(basename $c) $(cat $c/topology/core_id) $(cat $c/topology/thread_siblings_list)"
  done > $OUT/topology.txt 2>&1
  python3 -c "from tiered.store.offload import worker_cpus; from tiered.store.options import physical_cores as p; \
print('cores', p(), 'pins', worker_cpus(p()))"; cat $OUT/nodes.txt
}
