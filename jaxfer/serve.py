"""A small HTTP server over a :class:`jaxfer.inference.Predictor` (starlette + uvicorn).

    jaxfer serve --config configs/minilm_tweets.py --workdir runs/top2 --port 8000
    jaxfer serve --export runs/top2/export            # a StableHLO export: no model code needed

    curl -s localhost:8000/predict -d '{"inputs": ["what a lovely day"]}'
    {"predictions": [{"label": "positive", "probs": {"negative": 0.02, ...}}]}

Endpoints:

* ``POST /predict`` with a JSON object ``{"inputs": [item, ...]}``: texts for a
  text model, base64-encoded image files (PNG, JPEG ...) for an image model;
  1 to ``max_items`` items. Answers ``{"predictions": [row, ...]}`` in order
  (rows as :meth:`Predictor.to_rows`).
* ``GET /health``: ``{"status": "ok", "kind", "label_names", "requests",
  "batches": {size: count}}`` -- the batch sizes the server formed so far.

Batching: requests wait in a queue; one worker takes the first waiting request
and adds the next ones while the batch holds at most ``max_batch_size`` items
and no more than ``max_wait_ms`` has passed since it started, then runs them as
one batch (off the event loop, so requests keep arriving). Errors: malformed
JSON -> 400; a body over ``max_body_bytes`` -> 413; a body that is not
``{"inputs": [...]}`` with valid items -> 422. Each answer names the problem;
the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import json
import time
from typing import Any

from jaxfer.inference import Predictor, decode_image


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def parse_body(body: bytes, kind: str, max_items: int) -> list[Any]:
    """``{"inputs": [...]}`` -> validated items (decoded images for an image model)."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"body is not valid JSON: {e}") from None
    if not isinstance(data, dict) or set(data) != {"inputs"}:
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise RequestError(422, f'expected a JSON object {{"inputs": [...]}}; got {got}')
    items = data["inputs"]
    if not isinstance(items, list) or not items:
        raise RequestError(422, '"inputs" must be a non-empty list')
    if len(items) > max_items:
        raise RequestError(422, f'"inputs" has {len(items)} items; at most {max_items} per request')
    what = "a text" if kind == "text" else "a base64-encoded image file"
    for i, x in enumerate(items):
        if not isinstance(x, str):
            raise RequestError(422, f"inputs[{i}] must be {what}, got {type(x).__name__}")
    if kind == "text":
        return items
    images = []
    for i, x in enumerate(items):
        try:
            images.append(decode_image(base64.b64decode(x, validate=True)))
        except (binascii.Error, ValueError, OSError) as e:
            raise RequestError(422, f"inputs[{i}] is not {what}: {type(e).__name__}: {e}") from None
    return images


class Batcher:
    """Collects concurrent requests into batches of at most ``max_batch_size`` items."""

    def __init__(self, predictor: Predictor, max_batch_size: int, max_wait_ms: float):
        self.predictor = predictor
        self.max_batch_size, self.max_wait = int(max_batch_size), max_wait_ms / 1000.0
        self.queue: asyncio.Queue = asyncio.Queue()
        self.batch_sizes: collections.Counter = collections.Counter()
        self.requests = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def submit(self, items: list[Any]) -> list[dict[str, Any]]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((items, future))
        return await future

    async def _work(self) -> None:
        pending = None  # a request that did not fit the last batch
        while True:
            first = pending or await self.queue.get()
            pending, batch, n = None, [first], len(first[0])
            deadline = time.monotonic() + self.max_wait
            while n < self.max_batch_size:
                timeout = deadline - time.monotonic()
                try:
                    nxt = self.queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(
                        self.queue.get(), timeout)
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                if n + len(nxt[0]) > self.max_batch_size:
                    pending = nxt
                    break
                batch.append(nxt)
                n += len(nxt[0])
            items = [x for request, _ in batch for x in request]
            try:
                outputs = await asyncio.to_thread(self.predictor, items)
                rows = self.predictor.to_rows(outputs)
            except Exception as e:  # noqa: BLE001 -- answer every waiting request, keep serving
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.batch_sizes[n] += 1
            self.requests += len(batch)
            lo = 0
            for request, future in batch:
                if not future.done():
                    future.set_result(rows[lo:lo + len(request)])
                lo += len(request)


async def _read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"body of {int(declared)} bytes is over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def make_app(predictor: Predictor, *, max_batch_size: int | None = None, max_wait_ms: float = 10.0,
             max_body_bytes: int = 1 << 20, max_items: int = 64):
    """The ASGI app (a ``starlette.applications.Starlette``); ``app.state.batcher`` holds the stats."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    batcher = Batcher(predictor, max_batch_size or predictor.max_batch_size, max_wait_ms)

    async def predict(request):
        try:
            body = await _read_body(request, max_body_bytes)
            items = await run_in_threadpool(parse_body, body, predictor.kind, max_items)
        except RequestError as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        try:
            rows = await batcher.submit(items)
        except Exception as e:  # noqa: BLE001
            return JSONResponse({"error": f"{type(e).__name__}: {e}"}, status_code=500)
        return JSONResponse({"predictions": rows})

    async def health(request):
        return JSONResponse({"status": "ok", "kind": predictor.kind,
                             "label_names": list(predictor.label_names or []),
                             "requests": batcher.requests,
                             "batches": {str(k): v for k, v in sorted(batcher.batch_sizes.items())}})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = Starlette(routes=[Route("/predict", predict, methods=["POST"]),
                            Route("/health", health, methods=["GET"])], lifespan=lifespan)
    app.state.batcher = batcher
    return app


def serve(predictor: Predictor, *, host: str = "127.0.0.1", port: int = 8000, **limits) -> None:
    """Run the server until interrupted (``limits``: see :func:`make_app`)."""
    import uvicorn

    uvicorn.run(make_app(predictor, **limits), host=host, port=port, log_level="info")
