"""Expert kernels: fast paths for the routed-expert computation (Triton kernels, grouped GEMMs), each
beside the plain torch reference it is tested against (moe_naive.py: a loop over experts).

Owns: `triton_available`, the one place the runtime asks whether a Triton kernel may run. Kernel modules
(moe_decode.py, moe_grouped.py) import Triton at the top, so the runtime imports them only after this
answers True: the CPU torch wheel ships without Triton, and the CPU path is plain torch.
Does not own: choosing between kernels and the torch path (model/moe_gpu.py and model/moe.py do that).

Imports only from layout/ and store/ (a kernel may read a provider's slot weights); the model imports
kernels, never the other way round.
"""
from __future__ import annotations

import importlib.util

import torch


def triton_available(device: torch.device | str) -> bool:
    """True when the model may run Triton kernels on `device`: a CUDA device and Triton installed.
    (The CPU tests run the kernels through Triton's interpreter directly; the model's CPU path stays torch.)"""
    return torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is not None
