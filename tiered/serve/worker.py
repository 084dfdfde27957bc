"""The engine thread: the one thread that owns the model, the state pool and the batch.

Owns: `EngineWorker` (starts the thread, hands requests to the scheduler, runs steps while there is
work, sleeps when idle, stops gracefully: running rows finish within a deadline, then are cancelled).
Does not own: HTTP (app.py), request validation beyond the scheduler's, the step itself.
"""
from __future__ import annotations

import sys
import threading
import time
import traceback

from tiered.decode.scheduler import QueueFull, Request, Scheduler


class ShuttingDown(RuntimeError):
    """The worker is stopping and takes no new requests."""


class EngineWorker:
    """Runs `scheduler.step()` on its own thread while requests are queued or running."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name="tiered-engine", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> "EngineWorker":
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, req: Request) -> Request:
        """Queue a request (RequestError / QueueFull / ShuttingDown propagate to the caller)."""
        if not self._accepting:
            raise ShuttingDown("the server is shutting down")
        self.scheduler.submit(req)
        self._wake.set()
        return req

    def cancel(self, req: Request) -> None:
        """Free the request's row at the start of the next step (safe from any thread, idempotent)."""
        if not req.done:
            self.scheduler.cancel(req)
            self._wake.set()

    def stop(self, *, drain_s: float = 30.0) -> None:
        """Stop accepting; let running and queued rows finish for up to drain_s; cancel the rest; join."""
        self._accepting = False
        deadline = time.monotonic() + drain_s
        while self.alive and not self.scheduler.idle() and time.monotonic() < deadline:
            time.sleep(0.02)
        with self.scheduler._lock:
            pending = list(self.scheduler.waiting) + list(self.scheduler.running)
        for r in pending:
            self.cancel(r)
        deadline = time.monotonic() + 5.0
        while self.alive and not self.scheduler.idle() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        sch = self.scheduler
        while not self._stop.is_set():
            if sch.idle():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                sch.step()
            except Exception as e:  # a failed step fails its rows, not the server
                self.error = e
                print(f"tiered: step failed: {e}\n{traceback.format_exc()}", file=sys.stderr)
                with sch._lock:
                    rows = list(sch.running)
                for r in rows:
                    sch._finish(r, "error", error=f"{type(e).__name__}: {e}")


__all__ = ["EngineWorker", "ShuttingDown", "QueueFull"]
