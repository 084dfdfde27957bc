"""One token's routing (GPU): the router GEMV and softmax-top-k, cuBLAS + the top-k kernel against the fused kernel.

    python3 benchmarks/bench_router.py                      # H200: under a minute, compiles included
    python3 benchmarks/bench_router.py --shapes 10.6B --sweep 1:2048:4,2:1024:4,4:2048:8
    python3 benchmarks/bench_router.py --small              # CPU smoke run (Triton's interpreter); times mean nothing

What it times, per shape (10.6B: E 128, D 2048, K 8; 397B: E 512, D 4096, K 10), as a CUDA graph of --layers
layers, each one residual add + RMSNorm (kernels/fused_norm.add_rms_norm, the kernel before the router in the
decode step) then the routing of its output, each layer on its own router weights and buffers (--layers x the
router's bytes is larger than L2, so each router is read from HBM as in the step):
  - "norm only": the add+norm kernels alone (subtracted from the rows below: `route_us` is the routing's share);
  - "torch": F.linear (cuBLAS) then fused_route.softmax_topk (TIERED_ROUTER=torch);
  - "gemv": fused_route.router_topk(fuse=False): the GEMV kernel, then softmax_topk (TIERED_ROUTER=gemv);
  - "fused": router_topk (TIERED_ROUTER=fused) with the default tile (fused_route.router_tile) and the tiles of
    --sweep (BLOCK_R:BLOCK_D:warps);
  - "norm+gemv", "norm+fused": norm_router_topk, the add+norm inside the router's launch (the model's one-token
    path; gemv is TIERED_ROUTER's default): no separate add+norm kernel, so `route_us` = its time - "norm only";
    norm+gemv also with the --sweep tiles.
Before timing, every variant's ids and weights are checked against torch's (F.linear then model/routing.py's
softmax_topk, same logits rounding): the chosen sets must agree on all but ulp-level ties; a variant that does not
is reported as failed and not timed. PDL on where the device has it (kernels/pdl.py; TIERED_PDL=0 turns it off).
Prints a row per variant, then one JSON line last; writes $OUT/router.json when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {"10.6B": (128, 2048, 8), "397B": (512, 4096, 10)}
SMALL = {"tiny": (64, 96, 8)}


def _parse_tiles(text: str) -> list[tuple[int, int, int]]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        br, bd, w = (int(v) for v in part.split(":"))
        out.append((br, bd, w))
    return out


def _agree(a: torch.Tensor, b: torch.Tensor) -> int:
    """Tokens whose chosen expert sets differ between ids a and b [T, K]."""
    return int((a.sort(-1).values != b.sort(-1).values).any(-1).sum())


def run_shape(name: str, E: int, D: int, K: int, layers: int, tiles: list, dev: torch.device, timed: bool) -> list:
    from tiered.kernels.fused_norm import add_rms_norm
    from tiered.kernels.fused_route import norm_router_topk, router_tile, router_topk, softmax_topk
    from tiered.model.routing import softmax_topk as torch_softmax_topk

    g = torch.Generator(device=dev).manual_seed(E + D)
    bf = torch.bfloat16
    routers = [(torch.randn(E, D, device=dev, generator=g) / D ** 0.5 * 3).to(bf) for _ in range(layers)]
    h = [torch.randn(1, D, device=dev, generator=g).to(bf) for _ in range(layers)]
    delta = [torch.randn(1, D, device=dev, generator=g).to(bf) for _ in range(layers)]
    nw = torch.ones(D, device=dev, dtype=bf)
    counters = torch.zeros(layers, dtype=torch.int32, device=dev)

    def norm(i: int) -> torch.Tensor:
        return add_rms_norm(h[i], delta[i], nw, 1e-6)[1]

    def after_norm(route):  # a layer: the add+norm kernel, then `route` of its output
        return lambda i: route(i, norm(i))

    def norm_in(fuse, tile=None):  # a layer: one launch for the add+norm and the router (+ top-k when fused)
        return lambda i: norm_router_topk(h[i], delta[i], nw, 1e-6, routers[i], K, True, counters[i:i + 1],
                                          fuse=fuse, tile=tile)[3:]

    variants = {"torch": after_norm(lambda i, x: softmax_topk(F.linear(x, routers[i]), K, True)),
                "gemv": after_norm(lambda i, x: router_topk(x, routers[i], K, True, counters[i:i + 1],
                                                            fuse=False)[1:]),
                "norm+gemv": norm_in(False), "norm+fused": norm_in(True)}
    default = router_tile(E, D)
    for t in [default] + [t for t in tiles if t != default]:
        variants[f"fused {t[0]}:{t[1]}:{t[2]}" + (" (default)" if t == default else "")] = \
            (lambda tile: after_norm(lambda i, x: router_topk(x, routers[i], K, True, counters[i:i + 1],
                                                               fuse=True, tile=tile)[1:]))(t)
        if t != default:
            variants[f"norm+gemv {t[0]}:{t[1]}:{t[2]}"] = norm_in(False, t)
    rows = []
    ref = []
    for i in range(min(layers, 8)):
        x = norm(i)
        ref.append(torch_softmax_topk(F.linear(x, routers[i]), K, True)[0])
    norm_us = None
    if timed:
        from bench_moe_kernels import time_graph

        norm_us = time_graph([lambda i=i: norm(i) for i in range(layers)]) * 1e6
        rows.append({"shape": name, "variant": "norm only", "us_per_layer": norm_us})
        print(f"{name:6} {'norm only':28} {norm_us:7.2f} us a layer", flush=True)
    for vname, fn in variants.items():
        row = {"shape": name, "variant": vname}
        try:
            diff = sum(_agree(fn(i)[0], ref[i]) for i in range(len(ref)))
        except Exception as e:  # a tile the compiler refuses is a row, not the end of the run
            row.update(failed=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)
            print(f"{name:6} {vname:28} FAILED {row['failed']}", flush=True)
            continue
        row["sets_differ"] = diff
        if diff > 1:
            row["failed"] = f"{diff} of {len(ref)} tokens chose other experts than torch's route"
            rows.append(row)
            print(f"{name:6} {vname:28} FAILED {row['failed']}", flush=True)
            continue
        if timed:
            from bench_moe_kernels import time_graph

            t = time_graph([lambda i=i: fn(i) for i in range(layers)]) * 1e6
            row.update(us_per_layer=t, route_us=t - norm_us,
                       router_gbps=E * D * 2 / ((t - norm_us) * 1e-6) / 1e9 if t > norm_us else None)
            print(f"{name:6} {vname:28} {t:7.2f} us a layer, routing {t - norm_us:6.2f} us", flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--shapes", default="10.6B,397B", help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--layers", type=int, default=160, help="layers in the graph (default 160: 80 MB of 10.6B "
                    "routers, above the H200's L2)")
    ap.add_argument("--sweep", default="1:2048:1,1:2048:2,1:2048:8,2:2048:2,2:2048:4,2:2048:8,2:1024:4,4:2048:4,"
                    "4:2048:8,4:1024:4,8:1024:8", help="fused tiles BLOCK_R:BLOCK_D:warps besides the default")
    ap.add_argument("--small", action="store_true", help="CPU smoke run under Triton's interpreter (tiny shape)")
    args = ap.parse_args(argv)
    if args.small:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        dev, shapes, layers, timed = torch.device("cpu"), SMALL, 2, False
        tiles = _parse_tiles("2:64:2,4:32:2")
    else:
        if not torch.cuda.is_available():
            print("bench_router: needs a CUDA GPU (or --small for the CPU smoke run)", file=sys.stderr)
            return 2
        dev, layers, timed = torch.device("cuda"), args.layers, True
        try:
            shapes = {s: SHAPES[s] for s in args.shapes.split(",") if s}
        except KeyError as e:
            ap.error(f"--shapes: unknown shape {e}; known: {', '.join(SHAPES)}")
        tiles = _parse_tiles(args.sweep)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.dirname(here)]  # bench_moe_kernels; tiered from the checkout
    t0 = time.time()
    rows = []
    for name, (E, D, K) in shapes.items():
        rows += run_shape(name, E, D, K, layers, tiles, dev, timed)
    from tiered.kernels.pdl import pdl_enabled

    out = {"bench": "bench_router.py", "date": time.strftime("%Y-%m-%d"), "commit": os.environ.get("TIERED_COMMIT"),
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)",
           "pdl": pdl_enabled(dev), "layers": layers, "seconds": time.time() - t0, "rows": rows}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "router_small.json" if args.small else "router.json"), "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))
    failed = [r for r in rows if "failed" in r]
    return 1 if failed and args.small else 0


if __name__ == "__main__":
    sys.exit(main())
