"""The OpenAI-compatible server (app.py over worker.py) and the batch-job runner (batch.py), both driving the
one scheduler of tiered/decode/scheduler.py. The fastapi/uvicorn/openai dependencies are the `serve` extra."""
