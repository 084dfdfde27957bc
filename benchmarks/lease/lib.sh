# Sourced by the lease scripts (benchmarks/lease/s4_call*.sh): results go to /root/res_<script> and are packed into
# $OUT/<script>.tgz after each step (`pack`) and on exit, so a call cut by its time limit still brings back what it
# finished; the carried wheels (.whl: fla, gemlite) install under /tmp/site.
set -u
export PYTHONUNBUFFERED=1
BACK=$OUT; R=/root/res_$(basename "$0" .sh); mkdir -p $R; export OUT=$R
pack() { tar czf $BACK/$(basename "$0" .sh).tgz -C $R . 2>/dev/null; }
trap pack EXIT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site
