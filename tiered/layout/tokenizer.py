"""Text <-> token ids for a layout: the `tokenizers` library plus the chat template.

Owns: `Tokenizer` (encode/decode with tokenizer.json, special tokens from tokenizer_config.json,
the chat template rendered with jinja2 the way transformers renders it) and `StreamDecoder`
(turns generated ids into text deltas without splitting a multi-byte character).
Does not own: sampling or stopping (engine.py).
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any


class TokenizerError(ValueError):
    """A missing or unusable tokenizer; the message says which file and what to do."""


def _token_text(v: Any) -> str | None:
    if isinstance(v, dict):  # older tokenizer_config.json spells AddedToken as a dict
        return v.get("content")
    return v


def missing_tokenizer(model_dir: str | Path) -> str | None:
    """Why text cannot be encoded for the layout or checkpoint at `model_dir` (no tokenizer.json), else None.

    Checked before a checkpoint is repacked into the cache, so that a model that cannot take text fails at once.
    """
    d = Path(model_dir)
    if not d.is_dir() or (d / "tokenizer.json").is_file():
        return None
    return (f"{d} has no tokenizer.json, which tiered needs to turn text into tokens: copy tokenizer.json "
            f"(and tokenizer_config.json) from the model's original files into {d}")


class Tokenizer:
    """A tokenizer.json with the chat template and special tokens of its tokenizer_config.json."""

    def __init__(self, tokenizer_json: str | Path, config: dict[str, Any] | None = None) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(tokenizer_json)
        if not path.is_file():
            raise TokenizerError(f"{path} not found: the model needs a tokenizer.json next to its config "
                                 "(copy it into the layout directory)")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable or malformed JSON
            raise TokenizerError(f"{path} cannot be loaded ({str(e).strip() or type(e).__name__}): the file is "
                                 "corrupted or not a Hugging Face tokenizer.json; copy it again from the "
                                 "original checkpoint") from None
        self.config = dict(config or {})
        self.chat_template = self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()), None)
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        p = Path(path)
        cfg_path = p / "tokenizer_config.json"
        try:
            cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        except (ValueError, OSError) as e:
            raise TokenizerError(f"{cfg_path} cannot be read ({e}): the file is corrupted; copy it again from "
                                 "the original checkpoint") from None
        if not isinstance(cfg, dict):
            raise TokenizerError(f"{cfg_path} is not a JSON object: the file is corrupted; copy it again from "
                                 "the original checkpoint")
        tmpl = p / "chat_template.jinja"  # newer checkpoints keep the template in its own file
        if tmpl.is_file() and "chat_template" not in cfg:
            cfg["chat_template"] = tmpl.read_text()
        return cls(p / "tokenizer.json", cfg)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self._tok.token_to_id(text)

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None, template: str | None = None,
                            **variables: Any) -> str:
        """Render the conversation as the model expects, with transformers' jinja settings and helpers.

        `tools` (OpenAI tool definitions) are passed to the template as transformers does; `template`
        replaces the model's own (the server's fallback for models without one); `variables` are extra
        template variables (e.g. reasoning_effort for gpt-oss), as transformers passes them.
        """
        template = template or self.chat_template
        if not template:
            raise TokenizerError("this model's tokenizer_config.json has no chat_template: drop --chat, "
                                 "or use a chat model")
        import jinja2
        import jinja2.ext  # loopcontrols ({% break %}, {% continue %}): a submodule `import jinja2` does not load
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TokenizerError(f"chat template: {message}")

        def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
                   sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        def strftime_now(fmt: str) -> str:
            return datetime.now().strftime(fmt)

        class Generation(jinja2.ext.Extension):
            """{% generation %}...{% endgeneration %} marks assistant text for training masks: render the body."""

            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

            def _body(self, caller):
                return caller()

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[Generation, jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        try:
            compiled = env.from_string(template)
            return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   tools=tools or None, bos_token=self.bos_token or "",
                                   eos_token=self.eos_token or "", **variables)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"this model's chat template cannot be rendered ({type(e).__name__}: {e}); "
                                 "drop --chat and write the prompt in the model's format yourself") from None


class StreamDecoder:
    """Incremental detokenisation: feed ids one at a time, get the new text (held back mid-character).

    Decodes only a short window of recent ids (the prefix/read offsets of text-generation-inference),
    so a long generation costs O(n), and byte-level merges across token boundaries come out right.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were decoded and emitted already; they give context
        self.read = 0

    def feed(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd"):  # incomplete UTF-8: wait for the next token
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        """Whatever is still held back at the end of generation."""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):]
