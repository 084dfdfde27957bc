"""The batch scheduler's options: one definition for the `batch`/`serve` flags and the Scheduler's sizes.

Owns: `BatchConfig` (each option once, with its default, validation and command-line help; cli/options.py
builds the click options from its fields). Imports no torch, so the command line's --help stays fast.
Does not own: what the sizes turn into (state.py: pages; scheduler.py: rows and the queue).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


PREFILL_TOKENS = 256  # prompt tokens per step with an expert cache (or on CPU)
RESIDENT_PREFILL_TOKENS = 2048  # ... with every expert resident on CUDA (the model's expert path)


def _opt(default: Any, help: str, kind: Any = None) -> Any:
    """A BatchConfig field with its command-line description (cli/options.py builds the click option from it)."""
    return field(default=default, metadata={"help": help, "kind": kind})


@dataclass(frozen=True)
class BatchConfig:
    """The scheduler's options: the one definition of the `batch`/`serve` flags and of Scheduler's sizes."""

    max_batch: int = _opt(32, "Rows (requests) per step at most", ("min", 1))
    kv_gb: float | None = _opt(None, "GiB of paged K/V state shared by the rows, part of --vram-gb "
                                     "[default: max-batch full contexts, at most 2]")
    page_size: int = _opt(16, "Tokens per K/V page", ("min", 1))
    max_queue: int = _opt(256, "Requests waiting for a row at most (the server answers 503 beyond it)", ("min", 1))
    prefill_tokens: int | None = _opt(None, "Prompt tokens per step at most (prompt chunks ride the decode steps) "
                                            "[default: 2048 when every expert is resident on CUDA, else 256]",
                                      ("min", 1))
    no_cuda_graphs: bool = _opt(False, "Run every step eagerly: no CUDA graphs of the decode-only steps (taken on "
                                        "CUDA when every expert is resident and the model has attention layers "
                                        "only)", "flag")

    def __post_init__(self) -> None:
        if self.kv_gb is not None and not self.kv_gb > 0:
            raise ValueError(f"--kv-gb must be a positive number of GiB, got {self.kv_gb}")

    @classmethod
    def from_flags(cls, flags: dict[str, Any]) -> "BatchConfig":
        """The BatchConfig fields among parsed flags (None = not given)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in flags.items() if k in names and v is not None})
