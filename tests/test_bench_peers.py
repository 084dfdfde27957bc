"""benchmarks/bench_peers.py: its parsers over outputs captured from real llama.cpp runs (a CPU build of the
version tools/fetch_llamacpp.sh fetches, on the tiny model), its size estimate against transformers, and the
report's ratios over phase files. The whole pipeline against a llama.cpp build is a slow test (minutes), run
only when LLAMA_BIN names a build (LLAMA_CUDA=OFF JOBS=2 bash tools/build_llamacpp.sh .carry/llama.cpp /tmp/lbcpu
then LLAMA_BIN=/tmp/lbcpu/bin)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "peers"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_peers", REPO / "benchmarks" / "bench_peers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bp = load_bench()


def test_llama_bench_jsonl():
    text = (DATA / "llama-bench.jsonl").read_text()
    recs = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
    r = bp.parse_llama_bench("some log line\n" + text)
    pp = next(x for x in recs if x["n_gen"] == 0)
    tg = next(x for x in recs if x["n_prompt"] == 0)
    assert r["pp_tok_s"] == pp["avg_ts"] and r["pp_tokens"] == pp["n_prompt"]
    assert r["tg_tok_s"] == tg["avg_ts"] and r["tg_tokens"] == tg["n_gen"]
    assert r[f"tg{tg['n_gen']}_tok_s"] == tg["avg_ts"]
    assert r["model_n_params"] == pp["model_n_params"]
    with pytest.raises(bp.BenchError):
        bp.parse_llama_bench("| model | size |\n")


def test_batched_bench_jsonl():
    text = (DATA / "batched-bench.jsonl").read_text()
    rows = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
    r = bp.parse_batched_bench(text)
    assert sorted(r, key=int) == [str(x["pl"]) for x in rows]
    for x in rows:
        got = r[str(x["pl"])]
        assert got["s_tg_tok_s"] == x["speed_tg"] and got["s_pp_tok_s"] == x["speed_pp"]
        assert got["pp"] == x["pp"] and got["tg"] == x["tg"]
    with pytest.raises(bp.BenchError):
        bp.parse_batched_bench("|    PP |     TG |    B |\n")


def test_quantize_log():
    text = (DATA / "quantize.log").read_text()
    q = bp.parse_quantize_log(text)
    lines = [x for x in text.splitlines() if bp.QUANT_LINE.search(x)]
    assert q["tensors"] == len(lines) > 0
    converted = [x for x in lines if "converting to q4_0" in x]
    assert q["quantized"] == len(converted)
    kept = sum(v["count"] for v in q["kept_other_types"].values())
    assert kept == q["tensors"] - q["quantized"]
    # every 1-D tensor (norms) is left as it is; what else was kept is listed by name
    assert "f32" in q["kept_other_types"]
    with pytest.raises(bp.BenchError):
        bp.parse_quantize_log("main: build = 1\n")


@pytest.mark.parametrize("preset", ["qwen3-peers-tiny", "qwen3-tiny"])
def test_param_estimate_matches_transformers(preset):
    sys.path.insert(0, str(REPO / "tools"))
    from make_random_checkpoint import qwen3_config
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(qwen3_config(preset))
    assert bp.est_params(preset) == sum(p.numel() for p in model.parameters())


def phase_files(work: Path, S: dict) -> None:
    """Phase files as the phases write them, with round figures (the report divides them)."""
    tier = {"device": "cpu", "read_bw": {"gbps": 100.0, "sum_gbps": 100.0, "amax_gbps": 90.0},
            "bytes": {"dense_bytes": 600, "active_expert_bytes": 300, "kv_bytes_per_position": 1, "layers": 2,
                      "top_k": 2, "experts": 8, "vocab": 8192}, "modes": {}}

    def mode(dec: float, pre: float) -> dict:
        last = {"decode_graphs": "eager", "expert_slots": 4}
        return {"budget": None, "load_s": 1.0, "prefill_first": {"prefill_tok_s": pre / 2, "ttft_s": 2.0},
                "prefill_warm": {"prefill_tok_s": pre, "ttft_s": 1.0},
                "decode_short_first": {"decode_tok_s": dec / 2}, "decode_short": {"decode_tok_s": dec},
                "decode_long": {"decode_tok_s": dec, "last": last}, "short_over_long": 1.0}

    tier["modes"]["vram"] = mode(50.0, 400.0)
    tier["modes"]["offload"] = {"budget": {"expert_slots": 4}, "error": "RuntimeError: out of slots"}
    llama = {"runs": {"gpu_bf16": {"pp_tok_s": 800.0, "pp_tokens": S["pp"], "tg_tok_s": 100.0, "tg_tokens": S["tg"]},
                      "cpu_experts_bf16": {"pp_tok_s": 80.0, "pp_tokens": S["pp"], "tg_tok_s": 10.0,
                                           "tg_tokens": S["tg"]},
                      "batched_gpu_bf16": {"batch": {"1": {"s_tg_tok_s": 90.0, "s_pp_tok_s": 500.0}}}}}
    (work / "tiered.json").write_text(json.dumps(tier))
    (work / "llama.json").write_text(json.dumps(llama))


def test_report_ratios(tmp_path, capsys):
    S = dict(bp.TINY)
    phase_files(tmp_path, S)

    class A:
        tiny, device = True, "cpu"

    res, name = bp.phase_report(A, S, bp.Paths(tmp_path))
    m = res["models"][f"{S['preset']}-bf16"]
    assert m["decode_vs_llamacpp"] == pytest.approx(0.5)
    assert m["prefill_vs_llamacpp"] == pytest.approx(0.5)
    assert m["prefill_first_vs_llamacpp"] == pytest.approx(0.25)
    # ttft 1 s against llama.cpp's pp time (pp tokens / 800 tok/s)
    assert m["ttft_warm_over_llamacpp_pp_time"] == pytest.approx(1.0 / (S["pp"] / 800.0))
    per_tok = 600 + 300 + 1 * (S["decode_prompt"] + S["long"] / 2)
    assert m["hbm_bound"]["bytes_per_token"] == pytest.approx(per_tok)
    assert m["decode_vs_hbm_bound"] == pytest.approx(50.0 / (100e9 / per_tok))
    assert m["offload_decode_vs_llamacpp_cpu_experts"] is None  # the offload run failed: no ratio, a failure
    assert "tiered bf16 offload" in res["failures"] and "model" in res["missing_phases"]
    assert m["llamacpp_batched"]["gpu"]["1"]["s_tg_tok_s"] == 90.0
    assert m["llamacpp_batched"]["cpu_experts"] == {"error": "not run"}
    assert name == f"peers-{res['date']}-cpu.json"
    out = capsys.readouterr().out
    assert "| model" in out and "FAILED" in out and "not run" in out


def llama_build() -> Path | None:
    for d in (os.environ.get("LLAMA_BIN"),):
        if d and (Path(d) / "llama-bench").is_file() and (Path(d) / "llama-batched-bench").is_file():
            return Path(d)
    return None


@pytest.mark.slow
@pytest.mark.skipif(llama_build() is None or not (REPO / ".carry/llama.cpp/convert_hf_to_gguf.py").is_file(),
                    reason="needs LLAMA_BIN (a llama.cpp build) and .carry/llama.cpp (tools/fetch_llamacpp.sh)")
def test_pipeline_tiny(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_peers.py"), "--phase", "all", "--tiny",
                        "--device", "cpu", "--llama-bin", str(llama_build()), "--work", str(tmp_path)],
                       capture_output=True, text=True, timeout=1200, env={**os.environ, "OUT": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    m = res["models"]["qwen3-peers-tiny-bf16"]
    assert not res.get("failures"), res.get("failures")
    for k in ("decode_vs_llamacpp", "prefill_vs_llamacpp", "decode_vs_hbm_bound"):
        assert m[k] > 0
