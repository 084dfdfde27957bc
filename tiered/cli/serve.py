"""`tiered serve`: the OpenAI-compatible server (serve/app.py) on uvicorn, over one engine thread.

Owns: the command's flags (host, port, API key, drain time). Does not own: the app, the worker, the shared
model and scheduler flags (rows.py). Needs the `serve` extra (fastapi, uvicorn).
"""
from __future__ import annotations

import click

from tiered.cli.options import usage
from tiered.cli.rows import model_name, model_options, open_scheduler

CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.command("serve", context_settings=CTX)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", default=None, envvar="TIERED_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/* (or set TIERED_API_KEY).")
@click.option("--served-model-name", default=None, help="The model id /v1/models reports [default: the layout's name].")
@click.option("--drain-s", type=float, default=30.0, show_default=True,
              help="On shutdown, seconds running requests may take to finish before they are cancelled.")
@model_options
def serve(host, port, api_key, served_model_name, drain_s, **opts) -> None:
    """Serve the OpenAI API (completions, chat, streaming, tools) on HOST:PORT.

    \b
    Example:
      tiered serve -m ~/layouts/qwen3-30b --device cuda --vram-gb 8 --max-batch 32
      curl localhost:8000/v1/completions -d '{"prompt": "def fib(n):", "max_tokens": 32}' \\
           -H 'Content-Type: application/json'
    """
    try:
        import uvicorn

        from tiered.serve.app import create_app
    except ImportError as e:
        raise usage(f"tiered serve needs the serve extra ({e.name} is missing): "
                               "pip install 'tiered[serve]'") from None
    from tiered.serve.worker import EngineWorker

    engine, sch = open_scheduler(**opts)
    name = served_model_name or model_name(engine)
    worker = EngineWorker(sch).start()
    app = create_app(worker, model_name=name, api_key=api_key, drain_s=drain_s)
    click.echo(f"tiered serve: {name} on http://{host}:{port}/v1 (max batch {sch.max_batch}, "
               f"{sch.state.num_pages} KV pages of {sch.state.page_size})", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=max(1, int(drain_s)))
