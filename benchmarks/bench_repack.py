"""Repack benchmark (GPU box): `tiered repack` of the 10.6B Qwen3-MoE shape against the disk's write bandwidth.

Measures in one run: the disk's sequential write bandwidth (64 MiB writes + fsync, as the repacker
does), then `tiered repack` in a subprocess while sampling its RssAnon (anonymous memory, not page
cache) every 10 ms. Goals (issue 2): repack MB/s >= 0.7x the disk write bandwidth, peak RssAnon <= 2 GB.

    python3 benchmarks/bench_repack.py --work /root/bench [--preset qwen3-10b] [--src EXISTING_CKPT]
Prints a table, then one JSON line; writes $OUT/repack.json when OUT is set.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
from benchmeta import git_commit, write_out  # noqa: E402


def disk_write_gbps(path: Path, nbytes: int) -> float:
    """Sequential write of `nbytes` in 64 MiB pieces, fsync included (what repack does)."""
    buf = os.urandom(64 * 2**20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(nbytes // len(buf)):
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    secs = time.perf_counter() - t0
    path.unlink()
    return nbytes / secs / 1e9


def rss_anon_kib(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_repack(src: Path, dst: Path) -> dict:
    cmd = [sys.executable, "-m", "tiered", "repack", str(src), str(dst), "--force", "--json"]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    peak = [0]

    def sample() -> None:
        while p.poll() is None:
            peak[0] = max(peak[0], rss_anon_kib(p.pid))
            time.sleep(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = p.communicate()
    th.join()
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"repack failed with exit code {p.returncode}")
    res = json.loads(out.strip().splitlines()[-1])
    return {**res, "wall_s": wall, "peak_rss_anon_gb": peak[0] * 1024 / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder on the disk to measure")
    ap.add_argument("--preset", default="qwen3-10b")
    ap.add_argument("--src", type=Path, help="an existing checkpoint (skips building one)")
    ap.add_argument("--write-test-gb", type=float, default=8.0)
    ap.add_argument("--keep", action="store_true", help="keep the layout (for later benchmarks)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    src = a.src or a.work / f"{a.preset}-hf"
    build = None
    if not (src / "config.json").is_file():
        from make_random_checkpoint import make

        build = make(a.preset, src)
    write_gbps = disk_write_gbps(a.work / "write-test.bin", int(a.write_test_gb * 1e9) // 2**26 * 2**26)
    dst = a.work / f"{a.preset}-layout"
    rep = run_repack(src, dst)
    ratio = rep["mb_s"] / 1e3 / write_gbps
    import torch

    res = {
        "benchmark": "repack", "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "preset": a.preset, "checkpoint_build": build,
        "bytes_written": rep["bytes"], "repack_s": rep["seconds"], "repack_wall_s": rep["wall_s"],
        "repack_mb_s": rep["mb_s"], "disk_write_gb_s": write_gbps, "ratio_to_disk_write": ratio,
        "peak_rss_anon_gb": rep["peak_rss_anon_gb"], "goal_ratio": 0.7, "goal_rss_gb": 2.0,
    }
    print(f"{'bytes written':<28}{rep['bytes'] / 1e9:10.2f} GB")
    print(f"{'repack':<28}{rep['mb_s']:10.0f} MB/s ({rep['seconds']:.1f} s)")
    print(f"{'disk write (same run)':<28}{write_gbps * 1e3:10.0f} MB/s")
    print(f"{'ratio (goal >= 0.7)':<28}{ratio:10.2f}")
    print(f"{'peak RssAnon (goal <= 2)':<28}{rep['peak_rss_anon_gb']:10.2f} GB")
    line = write_out(res, "repack.json")
    if not a.keep:
        import shutil

        shutil.rmtree(dst)
    print(line)


if __name__ == "__main__":
    main()
