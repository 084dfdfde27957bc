"""`tiered run` edges: --max-context above the model's limit, --max-new-tokens 0, --prompt-file -, a terminal's
final newline, an unwritable layout cache, models by Hugging Face id, `tiered cache`, and the --help text."""
from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

from click.testing import CliRunner

import tiered
from conftest import REPO
from test_hub import lay_out_hub_cache
from tiered.cli.main import main
from tiered.layout.families import default_model_path


def invoke(*args, **kw):
    return CliRunner().invoke(main, list(map(str, args)), **kw)


def last_json(r):
    return json.loads(r.stderr.strip().splitlines()[-1])


def test_max_context_above_the_model_limit_is_refused(reference_layout):
    limit = tiered.load(reference_layout, device="cpu").config.max_position_embeddings
    r = invoke("run", "-m", reference_layout, "--max-context", limit + 1, "hello")
    assert r.exit_code == 2 and f"limit of {limit}" in r.stderr
    assert invoke("run", "-m", reference_layout, "--max-context", limit, "--max-new-tokens", 1, "hi").exit_code == 0


def test_zero_new_tokens_reports_no_rates(reference_layout):
    """It reported a prefill rate of ~2M tok/s (prompt tokens over a prefill that never ran)."""
    r = invoke("run", "-m", reference_layout, "--max-new-tokens", 0, "--json", "def f(x):")
    assert r.exit_code == 0 and r.stdout == ""
    s = last_json(r)
    assert s["tokens_generated"] == 0 and s["prefill_tok_s"] is None and s["decode_tok_s"] is None
    assert s["prefill_s"] is None and "n/a" in r.stderr


def test_prompt_file_dash_reads_stdin(reference_layout):
    r = invoke("run", "-m", reference_layout, "--prompt-file", "-", "--max-new-tokens", 4, "--json",
               input="import os\n")
    assert r.exit_code == 0, r.stderr
    e = tiered.load(reference_layout, device="cpu")
    assert last_json(r)["tokens_prompt"] == len(e.encode("import os\n"))
    assert r.stdout == e.generate("import os\n", max_new_tokens=4).text


def test_stdout_ends_with_a_newline_on_a_terminal(reference_layout):
    """On a terminal the text's line is ended, so the summary (stderr) does not run into it; piped, stdout is only
    the continuation (test_run_cli)."""
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "tiered", "run", "-m", str(reference_layout), "--max-new-tokens", "3",
                          "x = 1"], stdout=slave, stderr=subprocess.PIPE, cwd=REPO)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    p.wait(timeout=120)
    os.close(master)
    assert p.returncode == 0
    text = tiered.load(reference_layout, device="cpu").generate("x = 1", max_new_tokens=3).text
    assert out.replace(b"\r\n", b"\n").decode() == text + ("" if text.endswith("\n") else "\n")


def test_unwritable_cache_is_a_clear_error_from_run(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = invoke("run", "hello", env={"XDG_CACHE_HOME": str(blocker / "c")})
    assert r.exit_code == 1 and "XDG_CACHE_HOME" in r.stderr and "DST" not in r.stderr
    assert isinstance(r.exception, SystemExit)


def test_run_a_model_by_hub_id_offline(tmp_path):
    lay_out_hub_cache(tmp_path / "hub", "tiered-test/olmoe-code-17m", default_model_path())
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    r = invoke("run", "-m", "tiered-test/olmoe-code-17m", "--max-new-tokens", 3, "--json", "def f(", env=env)
    assert r.exit_code == 0, r.stderr
    assert last_json(r)["tokens_generated"] == 3
    assert "tiered-test--olmoe-code-17m-" in r.stderr  # the cache entry is named after the id
    r = invoke("run", "-m", "tiered-test/absent", "hi", env=env)
    assert r.exit_code == 1 and "not in the Hugging Face cache" in r.stderr


def test_cache_list_and_rm(reference_model, tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    assert "is empty" in invoke("cache", "list", env=env).stdout
    assert invoke("run", "-m", reference_model, "--max-new-tokens", 1, "x", env=env).exit_code == 0
    rows = [json.loads(x) for x in invoke("cache", "list", "--json", env=env).stdout.splitlines()]
    assert len(rows) == 1 and rows[0]["state"] == "current" and rows[0]["source"] == str(reference_model.resolve())
    r = invoke("cache", "list", env=env)
    assert rows[0]["key"] in r.stdout and "current" in r.stdout
    assert invoke("cache", "rm", env=env).exit_code == 2  # neither KEY nor --all
    assert invoke("cache", "rm", "nope", env=env).exit_code == 2
    r = invoke("cache", "rm", rows[0]["key"], env=env)
    assert r.exit_code == 0 and "freed" in r.stderr and not (tmp_path / "tiered" / rows[0]["key"]).exists()
    assert reference_model.is_dir()


def test_run_help_says_the_budget_clause_once_and_shows_chat():
    h = invoke("run", "--help").stdout
    assert h.count("selects the expert cache") == 1 and "Expert cache." not in h
    assert "Budget options" in h and "--chat" in h and 'run -m Qwen/Qwen3-30B-A3B --chat' in h
    assert "--prompt-file -" in h
