"""tiered: run Mixture-of-Experts models larger than GPU memory by streaming only the routed experts."""
__version__ = "0.1.0"
