"""How a step is run and sampled: the whole-step CUDA graph (graphed.py), the step cut at the routers with
host routing between segments (piecewise.py), and sampling (sampling.py). Above model/ and predict/,
below engine.py.
"""
