"""The `tiered` command line: one module per command (run, repack/verify, inspect, trace, tune), the shared
flags (options.py) and the group (main.py). The top layer: nothing in tiered imports it.
"""
