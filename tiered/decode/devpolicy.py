"""Each expert's predicted next use, kept on the device: what the device step evicts and prefetches by.

Owns: `NextUseParams` (the fitted weights, frozen), `NextUse` (the state tensors and the per-layer update the
device step runs inside its graph, no host sync), `fit_next_use` (the weights from a routing trace) and
`next_use_features` (the features, shared by the fit and by `NextUse`).
Does not own: the slot table and its kernels (kernels/slot_table.py takes the `nt` vector this module writes),
nor the router-history transitions (predict/predictors.py `transition_params`).

The model. At every visit of MoE layer j (one token), from the layer's routed ids, the number of visits of its
layer that an expert will miss before its next use, w, is predicted by a linear fit of log(1 + w):
  - for the experts of layer j, from the next token on (the "time" model):
    log(1 + w) = w_t . log(eps + [P(e at t+1 | ids at t) by time transitions, fast EWMA of its use, slow EWMA,
    used now]) + b_t;
  - for the experts of layer j+1, from this token on (the "layer" model):
    log(1 + w) = w_l . log(eps + [P(e | ids at j) by layer transitions, P(e | previous token's ids at j+1), fast
    EWMA, slow EWMA at j+1]) + b_l.
The EWMAs (one per key, resident or not) are over visits of the key's layer. A key's predicted next use, in layer
visits from the current layer j, is
    nt = d + M * w,   d = (j' - j - 1) mod M + 1 the visits until its layer j' runs next.
The slot table evicts the largest nt (Belady's rule with predicted next uses). The prefetch ranks the experts of
layer j+1 that are not resident by a third fit, a logistic P(used at this token) = sigmoid(w_p . (the layer model's
log features) + b_p) (the least-squares fit of log(1 + w) shrinks towards the mean and ranks these rarer events
worse: at prefetch_p 0.1, 12% of its prefetches were used; with the logistic fit, 27% at 0.15), and loads a
candidate only when that probability reaches `prefetch_p` and a slot is free or the victim's nt is at least the
candidate's.
(Fitting log(1 + w) ranked better than a logistic P(used at the next visit) with nt = d + M (1 - p) / p: 0.710 vs
0.702 of the serial Belady bound in benchmarks/sim_devtable.py's model, on fit/ windows.)
nt is scaled by `scale` and rounded to int64, so the kernel and its reference compare the same integers.

Legend: M MoE layers, E experts, K top-k, N keys = num_layers * E (model layers: dense layers' keys are never used).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

FAR = 1 << 40  # nt of a key no MoE layer uses (a dense layer's): never kept over a real one


@dataclass(frozen=True)
class NextUseParams:
    """Weights of the two linear models of log(1 + missed visits) (module doc) and the EWMA decays they were
    fitted with."""

    w_time: tuple[float, float, float, float]
    b_time: float
    w_layer: tuple[float, float, float, float]
    b_layer: float
    w_prefetch: tuple[float, float, float, float]
    b_prefetch: float
    fast: float = 0.8  # EWMA decay per visit of the layer
    slow: float = 0.97
    eps: float = 1e-3  # added before the logs
    p_min: float = 1e-3  # p = 1 / (1 + w) is clamped to [p_min, 1 - 1e-6]
    cap: int = 64  # the fit's labels: missed visits counted up to this many tokens
    scale: int = 64  # nt units per layer visit
    prefetch_p: float = 0.15  # a prefetch candidate below this probability (the logistic fit) is skipped


# Fitted by fit_next_use on ../shared/text/fit (the five files traced by the reference model, mapped by
# predict/replay.map_routing onto 8 layers x 128 experts, top-8, jitter 0: the offload benchmarks' routing), with the
# transitions of predict/predictors.transition_params on the same trace (benchmarks/sim_devtable.py --fit prints them).
DEFAULT_PARAMS = NextUseParams(w_time=(-0.1101, -0.3749, -0.0401, -0.0248), b_time=0.4727,
                               w_layer=(-0.1183, 0.0003, -0.3931, -0.0314), b_layer=0.5505,
                               w_prefetch=(2.3647, -1.2082, 0.5614, 0.0627), b_prefetch=2.2847)


class NextUse:
    """The device-side state: per MoE layer the EWMAs, the ids of its last visit and the probabilities; per key the
    scaled nt base. All updates are in place (static buffers for CUDA graphs).

    kernel: run the update as one Triton kernel (kernels/next_use.py); None = on CUDA. Else the torch ops below,
    which are its reference."""

    def __init__(self, params: NextUseParams, layer_trans: Tensor, time_trans: Tensor, *, moe_layers: list[int],
                 num_layers: int, num_experts: int, top_k: int, device: torch.device | str,
                 kernel: bool | None = None) -> None:
        M, E = len(moe_layers), num_experts
        if time_trans.shape != (M, E, E) or layer_trans.shape != (max(M - 1, 0), E, E):
            raise ValueError(f"next-use transitions must be layer_trans [{M - 1}, {E}, {E}] and time_trans [{M}, {E}, "
                             f"{E}], got {tuple(layer_trans.shape)} and {tuple(time_trans.shape)}: fit them on a "
                             f"trace of this model's MoE layers (predict/predictors.transition_params)")
        dev = torch.device(device)
        self.p = params
        self.M, self.E = M, E
        self.kernel = dev.type == "cuda" if kernel is None else bool(kernel)
        self.moe_layers = list(moe_layers)
        self.lt = layer_trans.to(dev, torch.float32).contiguous()  # [M-1, E, E]
        self.tt = time_trans.to(dev, torch.float32).contiguous()  # [M, E, E]
        self.w = torch.tensor([*params.w_time, params.b_time, *params.w_layer, params.b_layer, *params.w_prefetch,
                               params.b_prefetch], dtype=torch.float32, device=dev)  # [15]
        self.fast = torch.zeros(M, E, device=dev)
        self.slow = torch.zeros(M, E, device=dev)
        self.prev = torch.full((M, top_k), -1, dtype=torch.int64, device=dev)  # each layer's ids at its last visit
        self.prob = torch.zeros(M, E, device=dev)  # 1 / (1 + predicted missed visits)
        self.pf_prob = torch.zeros(M, E, device=dev)  # P(used at this token) of layer j+1, for the prefetch
        N = num_layers * E
        # d per (current MoE layer j, key): scaled visits until the key's layer runs next
        dist = torch.full((M, N), FAR, dtype=torch.int64)
        for j2, l2 in enumerate(self.moe_layers):
            for j in range(M):
                dist[j, l2 * E:(l2 + 1) * E] = ((j2 - j - 1) % M + 1) * params.scale
        self.dist = dist.to(dev)  # [M, N]
        self.base = torch.zeros(N, dtype=torch.int64, device=dev)  # scaled M * (1 - p) / p per key
        self.nt = torch.zeros(N, dtype=torch.int64, device=dev)  # what demand resolves read
        self.nt_pf = torch.zeros(N, dtype=torch.int64, device=dev)  # what the prefetch reads (its own stream)
        p0 = torch.full((E,), params.p_min, device=dev)
        for j in range(M):
            self._store(j, p0)
        # nt is kept ready for the next resolve: each update(j) ends by writing it for MoE layer (j + 1) mod M (the
        # kernel does it in the same launch), so a device step's resolve reads it without a kernel of its own and
        # the update can run beside the layer's copies (decode/devstep.py). `_ready` is the layer it serves.
        self._ready = 0
        torch.add(self.dist[0], self.base, out=self.nt)

    def _p_base(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z = predicted log(1 + missed visits) -> p = 1 / (1 + w) clamped, and the scaled base M * w rounded."""
        p = torch.exp(-z).clamp(self.p.p_min, 1 - 1e-6)
        return p, torch.floor(self.M * (1 - p) / p * self.p.scale + 0.5).long()

    def _store(self, j: int, p: Tensor) -> None:
        l = self.moe_layers[j]
        self.prob[j].copy_(p)
        self.base[l * self.E:(l + 1) * self.E].copy_(torch.floor(self.M * (1 - p) / p * self.p.scale + 0.5).long())

    def demand_nt(self, j: int) -> Tensor:
        """nt [N] for a resolve at MoE layer j (the static buffer): as the last update left it when that update was
        layer j - 1's (the device step's order, no launch), else written now."""
        if j != self._ready:
            torch.add(self.dist[j], self.base, out=self.nt)
            self._ready = j
        return self.nt

    def update(self, j: int, ids: Tensor) -> None:
        """After MoE layer j's resolve: fold its ids [K] into the state; new predictions for layer j (from the next
        token) and layer j+1 (this token); then nt for the next resolve, MoE layer (j + 1) mod M's."""
        p, E = self.p, self.E
        nxt = j + 1 < self.M
        l1 = self.moe_layers[j + 1] if nxt else 0
        self._ready = (j + 1) % self.M
        if self.kernel:
            from tiered.kernels.next_use import next_use_update

            next_use_update(ids, j, self.moe_layers[j] * E, l1 * E, prev=self.prev, tt=self.tt, lt=self.lt,
                            fast=self.fast, slow=self.slow, prob=self.prob, pf_prob=self.pf_prob, base=self.base,
                            w=self.w, decay=(p.fast, p.slow), eps=p.eps, p_min=p.p_min, scale=p.scale,
                            nt=self.nt, dist=self.dist[self._ready])
            return
        w = self.w
        oh = torch.zeros(E, device=ids.device).index_fill_(0, ids, 1.0)
        self.fast[j].mul_(p.fast).add_(oh, alpha=1 - p.fast)
        self.slow[j].mul_(p.slow).add_(oh, alpha=1 - p.slow)
        xt = torch.stack([self.tt[j].index_select(0, ids).sum(0), self.fast[j], self.slow[j], oh], 1)
        pj, bj = self._p_base(torch.log(xt + p.eps) @ w[0:4] + w[4])
        l = self.moe_layers[j]
        self.prob[j].copy_(pj)
        self.base[l * E:(l + 1) * E].copy_(bj)
        if nxt:
            pv = self.prev[j + 1]
            tprev = (self.tt[j + 1].index_select(0, pv.clamp(min=0)) * (pv >= 0)[:, None]).sum(0)
            xl = torch.stack([self.lt[j].index_select(0, ids).sum(0), tprev, self.fast[j + 1], self.slow[j + 1]], 1)
            lx = torch.log(xl + p.eps)
            p1, b1 = self._p_base(lx @ w[5:9] + w[9])
            self.prob[j + 1].copy_(p1)
            self.base[l1 * E:(l1 + 1) * E].copy_(b1)
            self.pf_prob[j + 1].copy_(torch.sigmoid(lx @ w[10:14] + w[14]))
        self.prev[j].copy_(ids)
        torch.add(self.dist[self._ready], self.base, out=self.nt)

    def prefetch(self, j: int, slot_of: Tensor, count: int) -> Tensor:
        """Candidates [count] for MoE layer j+1, issued while layer j computes: the non-resident experts of highest
        prefetch probability, -1 where below prefetch_p (the kernel skips them); also writes nt_pf (d from layer j)."""
        l2 = self.moe_layers[j + 1]
        torch.add(self.dist[j], self.base, out=self.nt_pf)
        pr = torch.where(slot_of[l2 * self.E:(l2 + 1) * self.E] < 0, self.pf_prob[j + 1], -1.0)
        top = pr.topk(count)
        return torch.where(top.values >= self.p.prefetch_p, top.indices, -1)


def next_use_features(hot: np.ndarray, doc_starts: np.ndarray, layer_trans: np.ndarray, time_trans: np.ndarray,
                      fast: float, slow: float, cap: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """From a multi-hot trace hot [T, M, E] (documents starting at doc_starts): the time model's features [n, 4] and
    labels [n] (each (token, layer, expert) with a next token in its document) and the layer model's [n', 4], [n']
    (each (token t >= 1 of its document, layer j+1, expert)), as NextUse.update computes them, before the logs.
    Labels: the visits of the layer missed before the expert's next use (up to `cap` tokens ahead, within the
    document; never used again counts as cap)."""
    T, M, E = hot.shape
    fa = np.zeros((T, M, E), np.float32)
    sl = np.zeros((T, M, E), np.float32)
    start = np.zeros(T, bool)
    start[doc_starts] = True
    f = np.zeros((M, E), np.float32)
    s = np.zeros((M, E), np.float32)
    for t in range(T):
        if start[t]:
            f[:] = 0
            s[:] = 0
        f = fast * f + (1 - fast) * hot[t]
        s = slow * s + (1 - slow) * hot[t]
        fa[t], sl[t] = f, s
    after = np.full((T, M, E), cap, np.float32)  # tokens from t to the next use strictly after t
    ends = np.append(np.asarray(doc_starts)[1:], T)
    for a, b in zip(doc_starts, ends):
        nxt = np.full((M, E), np.inf)
        for t in range(b - 1, a - 1, -1):
            after[t] = np.minimum(nxt - t, cap)
            nxt = np.where(hot[t] > 0, t, nxt)
    tt = np.einsum("tme,mef->tmf", hot, time_trans)  # [T, M, E] P(at t+1) from token t at the same layer
    nxt = ~np.roll(start, -1)
    nxt[-1] = False  # token t has a next token in its document
    xt = np.stack([tt, fa, sl, hot], -1)[nxt].reshape(-1, 4)
    yt = (after[nxt] - 1).reshape(-1)
    lt = np.einsum("tme,mef->tmf", hot[:, :-1], layer_trans)  # [T, M-1, E] layer j+1 from layer j
    has_prev = ~start
    prev_tt = np.zeros_like(tt)
    prev_tt[1:] = tt[:-1]  # token t-1's prediction for token t at each layer
    fa_prev = np.zeros_like(fa)
    fa_prev[1:] = fa[:-1]
    sl_prev = np.zeros_like(sl)
    sl_prev[1:] = sl[:-1]
    xl = np.stack([lt, prev_tt[:, 1:], fa_prev[:, 1:], sl_prev[:, 1:]], -1)[has_prev].reshape(-1, 4)
    yl = np.where(hot[has_prev, 1:] > 0, 0, after[has_prev, 1:]).reshape(-1)
    return xt, yt, xl, yl


def fit_next_use(trace, layer_trans: Tensor, time_trans: Tensor, *, fast: float = 0.8, slow: float = 0.97,
                 eps: float = 1e-3, cap: int = 64, **kw) -> NextUseParams:
    """Least-squares fits of both models (log(1 + missed visits) on the log features) and the prefetch's logistic
    fit on `trace` (predict/trace.Trace over the model's MoE layers) with its fitted transitions; kw: other
    NextUseParams fields."""
    hot = trace.multi_hot().astype(np.float32)
    xt, yt, xl, yl = next_use_features(hot, trace.doc_offsets[:-1], layer_trans.numpy(), time_trans.numpy(), fast,
                                       slow, cap)

    def fit(x: np.ndarray, y: np.ndarray) -> tuple[tuple[float, ...], float]:
        a = np.concatenate([np.log(x.astype(np.float64) + eps), np.ones((len(x), 1))], 1)
        w = np.linalg.lstsq(a, np.log1p(y.astype(np.float64)), rcond=None)[0]
        return tuple(round(float(v), 4) for v in w[:4]), round(float(w[4]), 4)

    def fit_logistic(x: np.ndarray, y: np.ndarray) -> tuple[tuple[float, ...], float]:
        xs = torch.log(torch.from_numpy(x) + eps)
        ys = torch.from_numpy(y.astype(np.float32))
        lin = torch.nn.Linear(4, 1)
        opt = torch.optim.LBFGS(lin.parameters(), max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(lin(xs)[:, 0], ys)
            loss.backward()
            return loss

        opt.step(closure)
        return tuple(round(float(v), 4) for v in lin.weight.detach()[0]), round(float(lin.bias.detach()), 4)

    w_t, b_t = fit(xt, yt)
    w_l, b_l = fit(xl, yl)
    w_p, b_p = fit_logistic(xl, yl == 0)
    return NextUseParams(w_time=w_t, b_time=b_t, w_layer=w_l, b_layer=b_l, w_prefetch=w_p, b_prefetch=b_p, fast=fast,
                         slow=slow, eps=eps, cap=cap, **kw)
