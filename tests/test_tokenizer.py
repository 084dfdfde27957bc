"""Chat templates render without transformers (ChatML/Qwen, Mixtral, gpt-oss harmony), and a broken tokenizer is a
clear error.

The chat path is tested in a subprocess that cannot import transformers: transformers imports `jinja2.ext`, which
hid a missing import from tests that ran after it. The fixture templates under fixtures/chat_templates/ are written
from each format's documentation; the expected strings below are the formats as documented, and transformers'
own renderer is the oracle for the same templates.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import REPO
from tiered.cli.main import main
from tiered.layout.tokenizer import Tokenizer, TokenizerError

TEMPLATES = Path(__file__).resolve().parent / "fixtures" / "chat_templates"
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}
USER = [{"role": "user", "content": "What is 2+2?"}]
SYS_USER = [{"role": "system", "content": "Answer in one word."}, *USER]
TURNS = [*USER, {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]

HARMONY_HEAD = ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
                "Knowledge cutoff: 2024-06\nCurrent date: {date}\n\nReasoning: {effort}\n\n"
                "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>")

# (template file, messages, extra template variables, expected rendering with the generation prompt)
CASES = [
    ("chatml_qwen.jinja", USER, {},
     "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
     "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"),
    ("chatml_qwen.jinja", SYS_USER, {},
     "<|im_start|>system\nAnswer in one word.<|im_end|>\n"
     "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"),
    ("mixtral.jinja", USER, {}, "<s>[INST] What is 2+2? [/INST]"),
    ("mixtral.jinja", TURNS, {}, "<s>[INST] What is 2+2? [/INST]4</s>[INST] And 3+3? [/INST]"),
    ("harmony_gpt_oss.jinja", USER, {},
     HARMONY_HEAD + "<|start|>user<|message|>What is 2+2?<|end|><|start|>assistant"),
    ("harmony_gpt_oss.jinja", SYS_USER, {"reasoning_effort": "high"},
     HARMONY_HEAD.replace("{effort}", "high") + "<|start|>developer<|message|># Instructions\n\nAnswer in one word."
     "<|end|><|start|>user<|message|>What is 2+2?<|end|><|start|>assistant"),
    ("harmony_gpt_oss.jinja", TURNS, {},
     HARMONY_HEAD + "<|start|>user<|message|>What is 2+2?<|end|><|start|>assistant<|channel|>final<|message|>4"
     "<|end|><|start|>user<|message|>And 3+3?<|end|><|start|>assistant"),
]

NO_TRANSFORMERS = "import sys; sys.modules['transformers'] = None  # any import of transformers now fails\n"


def expected(text: str, dates: set[str]) -> set[str]:
    return {text.replace("{date}", d).replace("{effort}", "medium") for d in dates}


def today() -> str:
    return datetime.now().strftime("%Y-%m-%d")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TRANSFORMERS + code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_templates_render_as_documented_without_transformers(reference_model):
    """Each fixture renders to its documented format in a process where transformers cannot be imported."""
    cases = [(str(TEMPLATES / f), m, v) for f, m, v, _ in CASES]
    code = f"""
import json
from tiered.layout.tokenizer import Tokenizer
out = []
for path, messages, variables in {cases!r}:
    tok = Tokenizer({str(reference_model / "tokenizer.json")!r},
                    {{"chat_template": open(path).read(), **{SPECIAL!r}}})
    out.append(tok.apply_chat_template(messages, **variables))
assert "transformers" not in sys.modules or sys.modules["transformers"] is None
print(json.dumps(out))
"""
    d0 = today()
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    dates = {d0, today()}
    for (f, _, _, want), g in zip(CASES, got):
        assert g in expected(want, dates), (f, g)


@pytest.mark.parametrize("i", range(len(CASES)))
def test_templates_render_as_transformers_does(i, reference_model):
    """transformers' apply_chat_template (the oracle) gives the same string for every fixture case."""
    from transformers import PreTrainedTokenizerFast

    f, messages, variables, _ = CASES[i]
    template = (TEMPLATES / f).read_text()
    hf = PreTrainedTokenizerFast(tokenizer_file=str(reference_model / "tokenizer.json"), **SPECIAL)
    ours = Tokenizer(reference_model / "tokenizer.json", {"chat_template": template, **SPECIAL})
    for gen in (True, False):
        want = hf.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=gen,
                                      **variables)
        assert ours.apply_chat_template(messages, add_generation_prompt=gen, **variables) == want


def chat_layout(reference_layout: Path, root: Path, template: str | None) -> Path:
    """The reference layout's files (symlinked) with a tokenizer_config.json that has `template`."""
    lay = root / "chat-layout"
    lay.mkdir()
    for p in reference_layout.iterdir():
        if p.name != "tokenizer_config.json":
            (lay / p.name).symlink_to(p)
    cfg = json.loads((reference_layout / "tokenizer_config.json").read_text())
    if template is not None:
        cfg["chat_template"] = template
    (lay / "tokenizer_config.json").write_text(json.dumps(cfg))
    return lay


def test_run_chat_without_transformers(reference_layout, tmp_path):
    """`tiered run --chat` with a ChatML template, in a process that cannot import transformers (it crashed with
    AttributeError: module 'jinja2' has no attribute 'ext')."""
    template = (TEMPLATES / "chatml_qwen.jinja").read_text()
    lay = chat_layout(reference_layout, tmp_path, template)
    code = f"""
from tiered.cli.main import main
main(["run", "-m", {str(lay)!r}, "--device", "cpu", "--chat", "--max-new-tokens", "3", "--json", "hello"])
"""
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stderr.strip().splitlines()[-1])
    tok = Tokenizer.from_dir(lay)
    rendered = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert stats["tokens_prompt"] == len(tok.encode(rendered, add_special_tokens=False))
    assert stats["tokens_prompt"] > len(tok.encode("hello"))


def test_run_chat_without_a_template_is_a_clear_error(reference_layout, tmp_path):
    lay = chat_layout(reference_layout, tmp_path, None)
    r = run_python(f"from tiered.cli.main import main\nmain(['run', '-m', {str(lay)!r}, '--device', 'cpu', '--chat', 'hi'])")
    assert r.returncode == 2 and "no chat_template" in r.stderr and "Traceback" not in r.stderr


def test_template_errors_are_tokenizer_errors(reference_model):
    """raise_exception in a template (Mixtral's role check) and a broken template are TokenizerErrors."""
    mixtral = Tokenizer(reference_model / "tokenizer.json",
                        {"chat_template": (TEMPLATES / "mixtral.jinja").read_text(), **SPECIAL})
    with pytest.raises(TokenizerError, match="roles must alternate"):
        mixtral.apply_chat_template([{"role": "assistant", "content": "hi"}])
    broken = Tokenizer(reference_model / "tokenizer.json", {"chat_template": "{% for m in messages %}{{ m }"})
    with pytest.raises(TokenizerError, match="cannot be rendered"):
        broken.apply_chat_template(USER)


@pytest.mark.parametrize("name, content", [
    ("tokenizer.json", '{"version": "1.0", "model": {"type": "BPE", "vocab": '),  # cut off mid-file
    ("tokenizer.json", '{"not": "a tokenizer"}'),
    ("tokenizer_config.json", '{"chat_template": '),
    ("tokenizer_config.json", '["a list"]'),
])
def test_corrupt_tokenizer_files_are_clear_errors(reference_layout, tmp_path, name, content):
    """A corrupt tokenizer.json (or tokenizer_config.json) used to raise a traceback; now the message names it."""
    lay = chat_layout(reference_layout, tmp_path, None)
    (lay / name).unlink()
    (lay / name).write_text(content)
    with pytest.raises(TokenizerError, match=name.replace(".", r"\.")):
        Tokenizer.from_dir(lay)
    r = CliRunner().invoke(main, ["run", "-m", str(lay), "--device", "cpu", "hello"])
    assert r.exit_code in (1, 2) and isinstance(r.exception, SystemExit), r.exception
    assert name in r.stderr and "copy it again" in r.stderr
