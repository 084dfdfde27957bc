"""tiered: run Mixture-of-Experts models larger than GPU memory by streaming only the routed experts."""
__version__ = "0.1.0"


def __getattr__(name: str):
    # `tiered.load` imports torch lazily, so `import tiered` (the CLI's --help, --version) stays fast.
    if name == "load":
        from tiered.engine import load
        return load
    raise AttributeError(f"module 'tiered' has no attribute {name!r}")
