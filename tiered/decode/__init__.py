"""How steps run: the whole-step CUDA graph (graphed.py), the step cut at the routers with host routing between
segments (piecewise.py), sampling (sampling.py), and batches of requests: the continuous-batching scheduler
(scheduler.py, options.py) over the expert-major step (batchstep.py) and the paged per-layer state (state.py).
Above model/ and predict/, below engine.py.
"""
