"""The HTTP server: a Starlette app over dynamically batched models, with a page and metrics.

Routes: POST /v1/translate, POST /v1/pipeline/{task}, GET /v1/models, GET /health,
GET /metrics (Prometheus text), GET / (the page). Every answer is JSON with an "error"
message when it is not 200; no input produces a traceback.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import importlib.resources
import json
import threading
import time
from collections.abc import Sequence
from typing import Any

import prometheus_client as prom
from absl import logging
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from tfjax import pipelines
from tfjax.serve import models
from tfjax.serve.batching import (
    Batcher,
    BatchStats,
    ContinuousBatcher,
    DeadlineExceeded,
    Engine,
    Job,
    QueueFull,
    Runner,
)

# A request body at most, in bytes: MAX_TEXTS texts of the longest input take a few dozen kB,
# and anything larger would be read and parsed in the event loop before being refused.
MAX_BODY_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """How the server batches and bounds its work."""

    max_batch: int = 32  # sentences per model call; 1 turns batching off
    # Greedy seq2seq requests join and leave the running batch between decoder steps
    # (`tfjax.continuous`); False: they wait for whole-batch calls like the other requests.
    continuous: bool = True
    max_tokens: int = 4096  # input pieces per model call
    max_wait_ms: float = 5.0  # how long the oldest request waits for company
    max_queue: int = 256  # requests waiting per model before 429
    timeout: float = 60.0  # seconds a request may take before 504 (a request may ask less)

    @property
    def batches_continuously(self) -> bool:
        """Whether greedy requests go to a continuous decoder (batching on and continuous)."""
        return self.continuous and self.max_batch > 1


class Metrics:
    """The Prometheus series, in a registry of the app's own (several apps may share a process)."""

    def __init__(self) -> None:
        self.registry = prom.CollectorRegistry()
        r, m = self.registry, ("model",)
        self.queue_length = prom.Gauge("tfjax_queue_length", "requests queued", m, registry=r)
        self.batch_size = prom.Histogram(
            "tfjax_batch_size", "sentences per model call", m, registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )  # fmt: skip
        self.requests_per_call = prom.Histogram(
            "tfjax_requests_per_call", "requests per model call", m, registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )  # fmt: skip
        self.queue_wait = prom.Histogram(
            "tfjax_queue_wait_seconds", "time in the queue", m, registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )  # fmt: skip
        self.latency = prom.Histogram(
            "tfjax_request_latency_seconds", "time from arrival to answer", ("route",),
            registry=r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )  # fmt: skip
        self.tokens = prom.Counter("tfjax_generated_tokens", "pieces generated", m, registry=r)
        self.rejected = prom.Counter(
            "tfjax_rejected_requests", "requests not served", ("reason",), registry=r
        )
        self.responses = prom.Counter(
            "tfjax_responses", "answers by status", ("route", "status"), registry=r
        )
        # Generated tokens/s over the last WINDOW seconds, computed when scraped.
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        prom.Gauge(
            "tfjax_generated_tokens_per_second", f"pieces/s over the last {self.WINDOW:g} s",
            registry=r,
        ).set_function(self._rate)  # fmt: skip

    WINDOW = 10.0

    def record_batch(self, name: str, stats: BatchStats) -> None:
        self.batch_size.labels(name).observe(stats.items)
        self.requests_per_call.labels(name).observe(stats.jobs)
        for wait in stats.waits:
            self.queue_wait.labels(name).observe(wait)
        generated = models.generated_tokens(stats.results)
        self.tokens.labels(name).inc(generated)
        with self._lock:
            self._recent.append((time.monotonic(), generated))

    def _rate(self) -> float:
        with self._lock:
            while self._recent and self._recent[0][0] < time.monotonic() - self.WINDOW:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self.WINDOW


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


class Server:
    """The served models with their batchers, and the request handlers."""

    def __init__(self, served: Sequence[models.Served], config: ServerConfig) -> None:
        if not served:
            raise ValueError("no model to serve")
        names = [m.name for m in served]
        if len(set(names)) != len(names):
            raise ValueError(f"model names repeat: {names}")
        self.config = config
        self.models = {m.name: m for m in served}
        self.metrics = Metrics()
        self.batchers: dict[tuple[str, str], Batcher] = {}
        for m in served:
            routes = {"pipeline": models.pipeline_runner(m)}
            if m.task == "translation":
                routes["translate"] = models.translate_runner(m)
            for route, run in routes.items():
                engine = None
                if m.seq2seq and config.batches_continuously:
                    shape = models.seq2seq_shape(m) if route == "pipeline" else None
                    engine = models.ContinuousTranslations(m, shape)
                self.batchers[m.name, route] = self._batcher(m.name, run, engine)
            self.metrics.queue_length.labels(m.name).set_function(
                lambda name=m.name: sum(len(b) for (n, _), b in self.batchers.items() if n == name)
            )

    def _batcher(self, name: str, run: Runner, engine: Engine | None) -> Batcher:
        c = self.config
        kwargs: dict[str, Any] = dict(
            max_items=c.max_batch,
            max_tokens=c.max_tokens,
            max_wait=c.max_wait_ms / 1000,
            max_queue=c.max_queue,
            on_batch=lambda stats: self.metrics.record_batch(name, stats),
        )
        if engine is None:
            return Batcher(run, **kwargs)
        return ContinuousBatcher(run, engine, **kwargs)

    def stop(self) -> None:
        """Finish queued work and end every batcher's worker."""
        for batcher in self.batchers.values():
            batcher.stop()

    def model_for(self, name: Any, task: str) -> models.Served:
        """The named model, or the first one of `task` when no name is given."""
        if name is None:
            for m in self.models.values():
                if m.task == task:
                    return m
            raise models.BadRequest(f"no {task} model is served")
        if name not in self.models:
            raise models.BadRequest(f'"model": {name!r} is not served; try {list(self.models)}')
        if self.models[name].task != task:
            raise models.BadRequest(f"{name!r} is a {self.models[name].task} model, not {task}")
        return self.models[name]

    async def translate(self, request: Request) -> Response:
        body = await _json(request)
        m = self.model_for(body.pop("model", None), "translation")
        texts = models.texts_of(body.pop("text", None), "text")
        timeout = self._timeout(body.pop("timeout", None))
        key = models.settings(body, models.DECODING, "the request")
        results = await self._run(request, m, "translate", texts, key, timeout)
        return JSONResponse({"model": m.name, "translations": results})

    async def pipeline(self, request: Request) -> Response:
        task = request.path_params["task"]
        trained = pipelines.TASKS.get("translation" if task.startswith("translation_") else task)
        if trained is None:
            return _error(404, f"no pipeline {task!r}; expected one of {list(pipelines.TASKS)}")
        body = await _json(request)
        m = self.model_for(body.pop("model", None), trained)
        texts = models.texts_of(body.pop("inputs", None), "inputs")
        timeout = self._timeout(body.pop("timeout", None))
        parameters = body.pop("parameters", {})
        if body:
            raise models.BadRequest(
                f"unknown field(s) {sorted(body)}; expected inputs, parameters, model, timeout"
            )
        key = models.settings(parameters, models.PIPELINE_PARAMETERS[trained], '"parameters"')
        results = await self._run(request, m, "pipeline", texts, key, timeout)
        return JSONResponse({"model": m.name, "outputs": results})

    def _timeout(self, value: Any) -> float:
        if value is None:
            return self.config.timeout
        return models.number(1e-3, self.config.timeout)("timeout", value)

    async def _run(
        self,
        request: Request,
        model: models.Served,
        route: str,
        texts: list[str],
        key: Any,
        timeout: float,
    ) -> list[Any]:
        """Queue the texts as one job and wait for its results, the deadline or the client
        leaving, whichever comes first."""
        tokens = models.check_texts(model, texts, key)
        job = Job(key, texts, tokens, deadline=time.monotonic() + timeout)
        batcher = self.batchers[model.name, route]
        future = asyncio.wrap_future(batcher.submit(job))
        left = asyncio.ensure_future(_disconnected(request))
        done, _ = await asyncio.wait(
            {future, left}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        left.cancel()
        if future in done:
            return future.result()  # raises the job's failure, if any
        batcher.cancel(job)  # drops it unless a model call has taken it already
        if left in done:
            raise ClientLeft()
        raise DeadlineExceeded()


class ClientLeft(Exception):
    """The client closed its connection before its answer was ready."""


async def _disconnected(request: Request) -> None:
    """Returns once the client disconnects (the body has been read, so only that remains)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class TooLarge(Exception):
    """The request's body is over MAX_BODY_BYTES; answered 413 without reading the rest."""


async def _json(request: Request) -> dict[str, Any]:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise TooLarge()
    chunks, size = [], 0
    async for chunk in request.stream():  # a body sent without a length is counted as it comes
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise TooLarge()
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise models.BadRequest(f"the body is not JSON: {e}") from e
    if not isinstance(body, dict):
        raise models.BadRequest("the body must be a JSON object")
    return body


def _page() -> str:
    return importlib.resources.files("tfjax.serve").joinpath("page.html").read_text("utf-8")


def create_app(server: Server) -> Starlette:
    """The ASGI app over `server`; its lifespan stops the batchers once requests are done."""
    metrics = server.metrics

    def handler(route: str, method):
        async def handle(request: Request) -> Response:
            start = time.monotonic()
            try:
                response = await method(request)
            except models.BadRequest as e:
                metrics.rejected.labels("invalid").inc()
                response = _error(422, str(e))
            except QueueFull as e:
                metrics.rejected.labels("queue_full").inc()
                response = _error(429, f"busy: {e}; retry later", **{"Retry-After": "1"})
            except DeadlineExceeded:
                metrics.rejected.labels("deadline").inc()
                response = _error(504, "the request's deadline passed before it was served")
            except TooLarge:
                metrics.rejected.labels("invalid").inc()
                response = _error(413, f"the body is over {MAX_BODY_BYTES} bytes")
            except ClientLeft:
                metrics.rejected.labels("disconnected").inc()
                response = _error(499, "the client closed the connection")
            except (ValueError, TypeError) as e:  # the pipelines' own input checks
                metrics.rejected.labels("invalid").inc()
                response = _error(422, str(e))
            except Exception as e:
                logging.exception("request to %s failed", route)
                response = _error(500, f"{type(e).__name__}: the server failed this request")
            metrics.responses.labels(route, str(response.status_code)).inc()
            metrics.latency.labels(route).observe(time.monotonic() - start)
            return response

        return handle

    async def health(request: Request) -> Response:
        queued = sum(len(b) for b in server.batchers.values())
        return JSONResponse({"status": "ok", "queued": queued, "models": list(server.models)})

    async def metrics_text(request: Request) -> Response:
        return Response(prom.generate_latest(metrics.registry), media_type=prom.CONTENT_TYPE_LATEST)

    async def model_list(request: Request) -> Response:
        return JSONResponse({"models": [m.info() for m in server.models.values()]})

    async def page(request: Request) -> Response:
        return HTMLResponse(_page())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        # Runs after uvicorn has answered every in-flight request (SIGTERM's graceful stop).
        await asyncio.get_running_loop().run_in_executor(None, server.stop)

    routes = [
        Route("/v1/translate", handler("translate", server.translate), methods=["POST"]),
        Route("/v1/pipeline/{task}", handler("pipeline", server.pipeline), methods=["POST"]),
        Route("/v1/models", model_list),
        Route("/health", health),
        Route("/metrics", metrics_text),
        Route("/", page),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
