"""`tiered run`: stdout is only the continuation, stats on stderr (JSON last), usage errors exit 2."""
from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

import tiered
from tiered.cli.main import main


def invoke(*args, **kw):
    return CliRunner().invoke(main, ["run", *map(str, args)], catch_exceptions=False, **kw)


def test_stdout_is_only_the_continuation(reference_layout):
    """stdout equals the engine's greedy continuation exactly; the last stderr line is JSON with the stats."""
    r = invoke("-m", reference_layout, "--max-new-tokens", 12, "--json", "def add(a, b):")
    assert r.exit_code == 0, r.stderr
    expected = tiered.load(reference_layout, device="cpu").generate("def add(a, b):", max_new_tokens=12).text
    assert r.stdout == expected
    stats = json.loads(r.stderr.strip().splitlines()[-1])
    assert stats["tokens_generated"] == 12 and stats["device"] == "cpu"
    for k in ("tokens_prompt", "prefill_tok_s", "decode_tok_s", "dtype", "attention", "io", "vram", "ram", "disk",
              "ttft_s", "load_s", "capture_s"):
        assert k in stats


def test_prompt_file_is_read_verbatim(reference_layout, tmp_path):
    """A prompt file's trailing newline is part of the prompt (it changes the tokens, hence the output)."""
    f = tmp_path / "p.txt"
    f.write_text("import os\n")
    r = invoke("-m", reference_layout, "--prompt-file", f, "--max-new-tokens", 8, "--json")
    assert r.exit_code == 0
    e = tiered.load(reference_layout, device="cpu")
    assert r.stdout == e.generate("import os\n", max_new_tokens=8).text
    assert json.loads(r.stderr.strip().splitlines()[-1])["tokens_prompt"] == len(e.encode("import os\n"))


def test_seeded_sampling_is_reproducible(reference_layout):
    """Two runs with the same --seed print the same text."""
    args = ("-m", reference_layout, "--max-new-tokens", 10, "--temperature", 0.9, "--top-p", 0.9, "--seed", 3, "x =")
    assert invoke(*args).stdout == invoke(*args).stdout


@pytest.mark.parametrize("args, needle", [
    (["", ], "empty"),
    ([], "no prompt"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "prompt-file"),
    (["hello", "--prompt-file", "{file}"], "not both"),
    (["-m", "/nonexistent/model", "hello"], "no such directory"),
    (["-m", "{file}", "hello"], "not a directory"),
    (["--device", "tpu", "hello"], "tpu"),
    (["--dtype", "int4", "hello"], "int4"),
    (["--max-context", "2", "hello world, a prompt of several tokens"], "max-context"),
    (["--temperature", "-1", "hello"], "temperature"),
    (["--top-p", "1.5", "hello"], "top-p"),
    (["--attn", "flash", "--device", "cpu", "hello"], "flash"),
    (["--chat", "hello"], "chat_template"),
    (["--expert-slots", "7", "hello"], "expert-slots"),
    (["--policy", "random", "hello"], "policy"),
    (["--io-threads", "0", "hello"], "io-threads"),
    (["--cpu-act", "q4", "hello"], "cpu-act"),
])
def test_usage_errors_exit_2(args, needle, tmp_path, reference_layout):
    """Usage errors exit with code 2 and a message that names the problem."""
    f = tmp_path / "p.txt"
    f.write_text("x")
    args = [a.replace("{file}", str(f)) for a in args]
    if "-m" not in args:
        args = ["-m", str(reference_layout), *args]
    r = invoke(*args)
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    assert needle in r.stderr
    assert r.stdout == ""


def test_default_model_runs(tmp_path, monkeypatch):
    """With no -m the embedded model is used (repacked into the cache, which is announced on stderr)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    r = invoke("--max-new-tokens", 4, "--json", "def ")
    assert r.exit_code == 0, r.stderr
    assert str(tmp_path) in r.stderr
    assert json.loads(r.stderr.strip().splitlines()[-1])["tokens_generated"] == 4


def test_every_budget_option_is_a_flag(reference_layout):
    """Each TierConfig field is a `run` flag that reaches the cache (one definition: store/options.py)."""
    from dataclasses import fields

    from tiered.store.options import TierConfig

    r = CliRunner().invoke(main, ["run", "--help"])
    for f in fields(TierConfig):
        assert "--" + f.name.replace("_", "-") in r.stdout
    r = invoke("-m", reference_layout, "--expert-slots", 16, "--ram-policy", "lfu", "--policy", "flru", "--flru-w", 3,
               "--io-threads", 2, "--max-new-tokens", 3, "--json", "def f():")
    assert r.exit_code == 0, r.stderr
    stats = json.loads(r.stderr.strip().splitlines()[-1])
    assert stats["expert_slots"] == 16 and stats["policy"] == "flru" and stats["ram_policy"] == "lfu"


def test_cpu_act_flag_sets_the_kernel_mode(reference_layout, monkeypatch):
    """--cpu-act q8 puts the CPU kernel in its q8 activation mode for the process (stats name it); without the flag
    TIERED_CPU_ACT decides, and the stats say float's kernel."""
    from tiered.kernels.cpu_kernel import ACT_ENV

    monkeypatch.setenv(ACT_ENV, "float")  # restored after the test, whatever the flag sets
    plain = invoke("-m", reference_layout, "--device", "cpu", "--max-new-tokens", 2, "--json", "def ")
    kern = json.loads(plain.stderr.strip().splitlines()[-1])["cpu_kernel"]
    if kern == "torch":
        pytest.skip("no native CPU kernel on this machine")
    assert kern.startswith("native-") and "q8act" not in kern
    r = invoke("-m", reference_layout, "--device", "cpu", "--cpu-act", "q8", "--max-new-tokens", 2, "--json", "def ")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stderr.strip().splitlines()[-1])["cpu_kernel"].startswith(kern + "-q8act")
    assert os.environ[ACT_ENV] == "q8"
    assert "has no effect" in r.stderr  # the reference layout's experts are bf16: nothing for the mode to change


def test_cpu_act_note_only_without_q4(reference_model, tmp_path, monkeypatch):
    """On a q4 layout --cpu-act q8 applies, so no note that it has no effect."""
    from tiered.kernels.cpu_kernel import ACT_ENV
    from tiered.layout.repack import repack

    monkeypatch.setenv(ACT_ENV, "float")
    dst = tmp_path / "q4"
    repack(reference_model, dst, experts="q4", q4_refine="none", progress=False)
    r = invoke("-m", dst, "--device", "cpu", "--cpu-act", "q8", "--max-new-tokens", 2, "def ")
    assert r.exit_code == 0, r.stderr
    assert "has no effect" not in r.stderr


def test_cpu_dtype_hint_names_the_faster_fp32_path():
    """engine.cpu_dtype_hint: a CPU run in bf16 / fp16 over float experts is told that fp32 reads them natively; not
    on CUDA, not in fp32, not for quantized experts (the native kernel serves those in any dtype)."""
    import torch

    from tiered.engine import cpu_dtype_hint
    from tiered.kernels import cpu_kernel

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    native = cpu_kernel.shared() is not None
    h = cpu_dtype_hint(cpu, torch.bfloat16, "bfloat16")
    assert (h is not None) == native
    if native:
        assert "--dtype float32" in h and "bfloat16" in h
    assert cpu_dtype_hint(cpu, torch.float32, "bfloat16") is None
    assert cpu_dtype_hint(cuda, torch.bfloat16, "bfloat16") is None
    assert cpu_dtype_hint(cpu, torch.bfloat16, "q4") is None
