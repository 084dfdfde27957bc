"""Running a loaded engine over many inputs: the OpenAI-compatible server (app.py over worker.py) and the
batch-job runner (batch.py), both driving the one scheduler of tiered/decode/scheduler.py; quality evaluation
(evaluate.py). The fastapi/uvicorn/openai dependencies are the `serve` extra."""
