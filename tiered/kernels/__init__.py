"""Triton kernels and their plain-torch references.

Owns: `triton_available`, the one place the runtime asks whether a kernel may run. Kernel modules
(moe_decode.py, moe_grouped.py) import Triton at the top, so the runtime imports them only after
this answers True: the CPU torch wheel ships without Triton, and the CPU path is plain torch.
Does not own: choosing between kernels and the torch path (the model does that).
"""
from __future__ import annotations

import importlib.util

import torch


def triton_available(device: torch.device | str) -> bool:
    """True when the model may run Triton kernels on `device`: a CUDA device and Triton installed.
    (The CPU tests run the kernels through Triton's interpreter directly; the model's CPU path stays torch.)"""
    return torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is not None
