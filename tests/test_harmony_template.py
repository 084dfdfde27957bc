"""gpt-oss's harmony chat template renders through tiered's tokenizer exactly as transformers renders it
(the template uses `{% generation %}` blocks and `strftime_now`). The fixture is the one of branch i9."""
from __future__ import annotations

from pathlib import Path

from tiered.layout.families import default_model_path
from tiered.layout.tokenizer import Tokenizer

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "chat_templates" / "harmony_gpt_oss.jinja"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]


def test_harmony_renders_like_transformers():
    from transformers import AutoTokenizer

    template = FIXTURE.read_text()
    ours = Tokenizer.from_dir(default_model_path())
    ours.chat_template = template
    ref = AutoTokenizer.from_pretrained(default_model_path())
    for gen in (True, False):
        want = ref.apply_chat_template(MESSAGES, chat_template=template, tokenize=False, add_generation_prompt=gen)
        got = ours.apply_chat_template(MESSAGES, add_generation_prompt=gen)
        assert got == want
    assert "<|start|>assistant<|channel|>final<|message|>Hello<|end|>" in got
