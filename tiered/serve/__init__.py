"""Running a loaded engine over many inputs: quality evaluation (evaluate.py); the server and batch runner later."""
