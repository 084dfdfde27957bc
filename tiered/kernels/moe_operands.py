"""What a MoE kernel reads: views of the expert weights over a pool of blocks, their format and activation.

Owns: `ExpertOperands` (the gate/up/down views over any pool with the block layout, plus the room for
quantization scales and expert biases), `WeightFormat` and `Activation` (the constexpr enums that the
kernels branch on), `check_built`, which says what the kernels do not do yet, and `check_biases`.
Does not own: the pool or its layout (store/disk.py `expert_views` builds the views), the kernels.

Only `WeightFormat.FLOAT` (elements in a float dtype, read in place) is built here, with both activations:
SwiGLU and gpt-oss's clamped form with its expert biases (the decode kernels of moe_decode.py and the grouped
kernels of moe_grouped.py). Quantized experts are served by their own kernels, which read QuantWeight stacks
(codes, scales, mins) directly: quant_moe.py (a few tokens) and quant_grouped.py (prefill and batches; its WFMT
constexpr takes the WeightFormat values below), both with both activations and the biases.

Legend: S slots in the pool, D hidden, F expert FFN.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from torch import Tensor


class WeightFormat(IntEnum):
    """How a weight tile is stored in a block (a kernel constexpr)."""
    FLOAT = 0  # bf16 / fp16 / fp32 elements, converted on load
    Q8 = 1  # int8, symmetric, one bf16 scale per 128 along the input dimension (quant_grouped.py)
    Q4 = 2  # uint4 affine, groups of 64 along the input dimension, bf16 scale and minimum (quant_grouped.py)
    FP8 = 3  # e4m3, one fp32 scale per 128 x 128 block (quant_grouped.py)
    MXFP4 = 4  # e2m1 in blocks of 32 with a shared e8m0 scale (quant_grouped.py)


class Activation(IntEnum):
    """The gated activation between the up and down projections (a kernel constexpr)."""
    SWIGLU = 0  # silu(gate) * up
    SWIGLU_CLAMP = 1  # gpt-oss: gate clamped above at limit, up to [-limit, limit],
    #                   gate * sigmoid(alpha gate) * (up + 1)


@dataclass(frozen=True)
class ExpertOperands:
    """Routed-expert weights as [S, ...] views over a pool (row stride = the block size), read in place."""
    gate: Tensor  # [S, F, D] stored dtype (packed codes for quantized formats)
    up: Tensor  # [S, F, D]
    down: Tensor  # [S, D, F]
    fmt: WeightFormat = WeightFormat.FLOAT
    act: Activation = Activation.SWIGLU
    gate_scale: Tensor | None = None  # per-format scale (and minimum) views, [S, ...]; None for FLOAT
    up_scale: Tensor | None = None
    down_scale: Tensor | None = None
    gate_bias: Tensor | None = None  # [S, F] expert biases (gpt-oss); None = no bias
    up_bias: Tensor | None = None  # [S, F]
    down_bias: Tensor | None = None  # [S, D]
    alpha: float = 1.702  # SWIGLU_CLAMP's sigmoid slope and clamp limit
    limit: float = 7.0

    @classmethod
    def of(cls, weights: Any, act: Any = None) -> "ExpertOperands":
        """From store.disk.ExpertWeights (or anything with gate/up/down views, and optional gate_bias, up_bias,
        down_bias): FLOAT, with the weights' biases; act None = SwiGLU, else an object with `alpha` and `limit`
        (model/moe.py ClampedSwiGLU) = SWIGLU_CLAMP. An ExpertOperands is returned as it is (act must be None)."""
        if isinstance(weights, ExpertOperands):
            if act is not None:
                raise ValueError("ExpertOperands.of: the operands carry their activation already")
            return weights
        b = {n: getattr(weights, n, None) for n in ("gate_bias", "up_bias", "down_bias")}
        if act is None:
            return cls(weights.gate, weights.up, weights.down, **b)
        return cls(weights.gate, weights.up, weights.down, act=Activation.SWIGLU_CLAMP, alpha=float(act.alpha),
                   limit=float(act.limit), **b)

    def bias_args(self, which: tuple[str, ...]) -> tuple:
        """The bias pointers a kernel launch takes for the named biases, then their row stride; placeholders (the
        down view, never read) and 0 when the experts have none."""
        if not self.has_bias:
            return (*(self.down for _ in which), 0)
        bs = [getattr(self, n) for n in which]
        if len({b.stride(0) for b in bs}) != 1:
            raise ValueError(f"expert biases {which} need one row stride, got {[b.stride(0) for b in bs]}")
        return (*bs, bs[0].stride(0))

    @property
    def has_bias(self) -> bool:
        return self.gate_bias is not None

    @property
    def hidden(self) -> int:
        return self.down.shape[1]  # D

    @property
    def ffn(self) -> int:
        return self.down.shape[2]  # F

    @property
    def num_slots(self) -> int:
        return self.gate.shape[0]  # S


def check_built(ops: ExpertOperands) -> None:
    """Raise NotImplementedError for the formats the float kernels do not read, ValueError for views and biases of
    the wrong shape."""
    if ops.fmt != WeightFormat.FLOAT:
        raise NotImplementedError(f"MoE kernels: weight format {ops.fmt.name} is not built yet (FLOAT only)")
    D, F = ops.hidden, ops.ffn
    check_biases(ops, F, D)
    if tuple(ops.gate.shape[1:]) != (F, D) or tuple(ops.up.shape[1:]) != (F, D):
        raise ValueError(f"expert views disagree: gate {list(ops.gate.shape)}, up {list(ops.up.shape)}, "
                         f"down {list(ops.down.shape)} (want [S, F, D], [S, F, D], [S, D, F])")
    for name, t in (("gate", ops.gate), ("up", ops.up), ("down", ops.down)):
        if t.stride(-1) != 1:
            raise ValueError(f"expert view {name} must be contiguous along its last dimension, "
                             f"strides {t.stride()}")


def check_biases(ops: ExpertOperands, F: int, D: int) -> None:
    """Raise ValueError unless the operands carry all three expert biases or none, as gate_bias, up_bias [S, F] and
    down_bias [S, D] contiguous along their last dim (F and D given: quantized stacks' views are packed)."""
    biases = (ops.gate_bias, ops.up_bias, ops.down_bias)
    if all(b is None for b in biases):
        return
    S = ops.num_slots
    for name, b, w in zip(("gate_bias", "up_bias", "down_bias"), biases, ((S, F), (S, F), (S, D))):
        if b is None or tuple(b.shape) != w or b.stride(-1) != 1:
            raise ValueError(f"expert biases: {name} is {None if b is None else list(b.shape)}, want {list(w)} "
                             "contiguous along its last dimension (all three or none)")
