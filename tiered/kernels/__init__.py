"""Expert kernels: fast paths for the routed-expert computation (Triton kernels, grouped GEMMs), each
beside the plain torch reference it is tested against (moe_naive.py: a loop over experts).

Owns: `triton_available`, the one place the runtime asks whether a Triton kernel may run, and
`cuda_library_imports`, the same question for a kernel library (flash-attn, flash-linear-attention). Kernel modules
(moe_decode.py, moe_grouped.py) import Triton at the top, so the runtime imports them only after this
answers True: the CPU torch wheel ships without Triton, and the CPU path is plain torch.
Does not own: choosing between kernels and the torch path (model/moe_gpu.py and model/moe.py do that).

Imports only from layout/ and store/ (a kernel may read a provider's slot weights); the model imports
kernels, never the other way round.
"""
from __future__ import annotations

import importlib
import importlib.util

import torch


def triton_available(device: torch.device | str) -> bool:
    """True when the model may run Triton kernels on `device`: a CUDA device and Triton installed.
    (The CPU tests run the kernels through Triton's interpreter directly; the model's CPU path stays torch.)"""
    return torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is not None


def cuda_library_imports(device: torch.device, module: str, *names: str) -> bool:
    """True when `device` is CUDA and `from module import names` works. Any failure counts as unavailable:
    ImportError, or a wheel built for another torch, CUDA or Triton, which raises other errors on import."""
    if device.type != "cuda":
        return False
    try:
        mod = importlib.import_module(module)
        for n in names:
            getattr(mod, n)
    except Exception:
        return False
    return True
