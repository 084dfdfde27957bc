"""Checkpoint -> layout on disk: the normalised config, the family files, the layout format, the repacker,
the tokenizer shipped with a layout. The bottom layer: imports nothing else from tiered.

(The family files themselves, `layouts/*.toml`, are package data: `tiered.layouts`.)
"""
