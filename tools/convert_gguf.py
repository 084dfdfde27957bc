"""Run llama.cpp's convert_hf_to_gguf.py on a random-weight checkpoint whose tokenizer llama.cpp does not know.

The converter hashes how the tokenizer splits a fixed text and refuses unknown hashes ("BPE pre-tokenizer was
not recognized"). Our random checkpoints carry the reference model's byte-level BPE tokenizer, which splits like
Qwen2's, so the check is answered with `--pre` (default "qwen2") at run time: the carried llama.cpp source is
never edited.

    python3 tools/convert_gguf.py --llama-dir .carry/llama.cpp CKPT --outtype bf16 --outfile M.gguf

Every argument after the wrapper's own is passed to convert_hf_to_gguf.py unchanged.
"""
from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path


def check_tokenizer(ckpt: Path) -> None:
    """Fail early, and say why, where the converter would fail late and cryptically: a checkpoint without a tokenizer
    (make_random_checkpoint.py writes none unless given --tokenizer; transformers then asks for sentencepiece or
    tiktoken), or one whose token ids do not fit config.json's vocab_size (a bare assert in get_vocab_base)."""
    tok = ckpt / "tokenizer.json"
    if not tok.is_file():
        if (ckpt / "tokenizer.model").is_file():
            return
        raise SystemExit(f"{ckpt} has no tokenizer.json: llama.cpp's converter needs one. For a random checkpoint pass "
                         "make_random_checkpoint.py --tokenizer tiered/data/olmoe-code-17m (8,192 tokens: the preset's "
                         "vocab_size must be at least that), or copy a byte-level BPE tokenizer.json in")
    cfg = json.loads((ckpt / "config.json").read_text())
    vocab = cfg.get("vocab_size", cfg.get("text_config", {}).get("vocab_size"))
    model = json.loads(tok.read_text()).get("model", {})
    ids = [*model.get("vocab", {}).values()] if isinstance(model.get("vocab"), dict) else []
    if vocab is not None and ids and max(ids) >= vocab:
        raise SystemExit(f"{tok} has token ids up to {max(ids)} but {ckpt}/config.json has vocab_size {vocab}: "
                         "the converter requires every id below vocab_size")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-dir", type=Path, required=True, help="llama.cpp source tree (has convert_hf_to_gguf.py)")
    ap.add_argument("--pre", default="qwen2", help="the BPE pre-tokenizer name to record in the GGUF")
    a, rest = ap.parse_known_args()
    script = a.llama_dir / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise SystemExit(f"no convert_hf_to_gguf.py in {a.llama_dir}: pass the llama.cpp source tree "
                         "(tools/fetch_llamacpp.sh makes one)")
    sys.path.insert(0, str(a.llama_dir))
    sys.path.insert(1, str(a.llama_dir / "gguf-py"))
    import conversion.base as base

    patched = []
    for cls in vars(base).values():
        if isinstance(cls, type) and "get_vocab_base_pre" in cls.__dict__:
            cls.get_vocab_base_pre = lambda self, tokenizer, _pre=a.pre: _pre
            patched.append(cls.__name__)
    if not patched:
        raise SystemExit(f"{a.llama_dir}/conversion/base.py defines no get_vocab_base_pre: this llama.cpp version "
                         "checks the pre-tokenizer elsewhere; update tools/convert_gguf.py")
    for ckpt in (Path(x) for x in rest if not x.startswith("-")):
        if (ckpt / "config.json").is_file():
            check_tokenizer(ckpt)
    sys.argv = [str(script), *rest]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
