"""``srp4ctr serve``: an HTTP server (FastAPI on uvicorn) in front of one engine.

Endpoints: ``POST /v1/score`` (one user), ``POST /v1/score_many`` (several), ``GET /healthz``
(the process answers), ``GET /readyz`` (model loaded and warmed), ``GET /metrics``
(Prometheus text format, ``prometheus-client``), ``GET /docs`` (the OpenAPI schema of every
field).

Requests are scored by one :class:`ScoringService`: every engine call runs on one worker thread
off the event loop. With batching on (the default), concurrent requests are gathered for at most
``batch_window_ms`` (default 2 ms) or until ``max_batch_requests`` / ``max_batch_candidates``,
their missing users are encoded in one ``encode_arrays`` call and all their candidates scored in
one jagged ``score_many`` call; the results equal one-at-a-time scoring. Users come from the
state store (:mod:`srp4ctr.server.store`) when their exact history was encoded before; the
same missing user asked for by concurrent requests is encoded once.

Bad input gets a 4xx with the engine's own message (400; 422 for a body that does not fit the
schema; 413 for more candidates, history or body bytes than the limits), never a traceback.
"""

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from srp4ctr.errors import InputError

from .store import MemoryStore, RedisStore, StateStore, history_version, state_key

__all__ = ["ServerConfig", "ScoringService", "create_app", "app_from_env"]

log = logging.getLogger("srp4ctr.server")
CONFIG_ENV = "SRP4CTR_SERVE_CONFIG"


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``srp4ctr serve`` takes (JSON-able; workers read it from the environment)."""

    model: str = ""
    backend: str = "auto"
    threads: int | None = None
    batching: bool = True
    batch_window_ms: float = 2.0
    max_batch_requests: int = 64
    max_batch_candidates: int = 32768
    max_candidates: int = 10000
    max_history: int = 5000
    max_users: int = 64
    max_body_bytes: int = 4 << 20
    store: Literal["memory", "redis", "none"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    store_ttl_s: float = 3600.0
    store_bytes: int = 256 << 20
    store_timeout_s: float = 0.05
    engine_options: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("max_batch_requests", "max_batch_candidates", "max_candidates",
                     "max_history", "max_users", "max_body_bytes", "store_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be a positive integer, got {v!r}")
        if not 0 <= float(self.batch_window_ms) <= 1000:
            raise InputError(f"batch_window_ms must lie in [0, 1000], got {self.batch_window_ms}")
        if self.store not in ("memory", "redis", "none"):
            raise InputError(f"store must be memory, redis or none, got {self.store!r}")

    @classmethod
    def from_json(cls, text: str) -> "ServerConfig":
        d = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise InputError(f"unknown server settings {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def make_store(cfg: ServerConfig) -> StateStore:
    if cfg.store == "memory":
        return MemoryStore(cfg.store_bytes, cfg.store_ttl_s)
    if cfg.store == "redis":
        return RedisStore(cfg.redis_url, cfg.store_ttl_s, cfg.store_timeout_s)
    return StateStore()


# ------------------------------------------------------------------------------------------
# metrics


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("srp4ctr_requests_total", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("srp4ctr_request_seconds", "request latency",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1,
                                          2, 5))
        self.batch_requests = Histogram("srp4ctr_batch_requests", "users scored per engine call",
                                        registry=self.registry,
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.batch_candidates = Histogram("srp4ctr_batch_candidates",
                                          "candidates scored per engine call",
                                          registry=self.registry,
                                          buckets=(1, 10, 100, 1000, 4000, 16000, 64000))
        self.engine = Histogram("srp4ctr_engine_seconds",
                                "engine-thread time per engine call (checks, user lookup and "
                                "encoding, scoring): the request latency less this is the "
                                "server's own (HTTP, JSON, queue)", registry=self.registry,
                                buckets=(.0002, .0005, .001, .002, .005, .01, .02, .05, .1, .2,
                                         .5, 1, 2, 5))
        self.store = Histogram("srp4ctr_store_seconds", "user-state store calls (get: the "
                               "look-up and decoding of a cached state; put)", ["op"],
                               registry=self.registry,
                               buckets=(.00005, .0001, .0002, .0005, .001, .002, .005, .01,
                                        .02, .05, .1))
        self.state = Counter("srp4ctr_user_state_total",
                             "user states by origin: store hit, encoded, or store error",
                             ["result"], registry=self.registry)

    def text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ------------------------------------------------------------------------------------------
# the scoring service: batching, the state store, the one engine thread


@dataclass
class _Job:
    history: dict
    user_id: Any
    candidates: list
    strict: bool
    future: asyncio.Future
    result: Any = None
    error: BaseException | None = None
    state: str = ""


class ScoringService:
    """Scores requests on one engine, one worker thread, with optional batching."""

    def __init__(self, engine, cfg: ServerConfig, store: StateStore, metrics: Metrics):
        self.engine, self.cfg, self.store, self.metrics = engine, cfg, store, metrics
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="srp4ctr-engine")
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        self.ready = False
        self.encoded = 0
        self.arriving = 0  # requests received by the HTTP layer and not yet queued here
        self.in_flight = 0  # scoring requests received and not yet answered

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self._warm_up)
        self.ready = True

    async def stop(self) -> None:
        """Finish every queued request, then stop the loop and the engine thread."""
        self.ready = False
        if self._queue is not None:
            await self._queue.join()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pool.shutdown(wait=True)

    def _warm_up(self) -> None:
        e = self.engine
        cache = e.encode_user({"item_id": [], "timestamp": [],
                               **({e.dataset.kind: []} if e.dataset.kind else {})})
        e.score(cache, [e.dataset.item_raw[1]])

    async def score(self, history: dict, user_id: Any, candidates: list,
                    strict: bool) -> tuple[np.ndarray, str]:
        job = _Job(history, user_id, candidates, strict, asyncio.get_running_loop().create_future())
        await self._queue.put(job)
        self.arriving -= 1  # counted by the HTTP layer when it arrived
        return await job.future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        window = self.cfg.batch_window_ms / 1000 if self.cfg.batching else 0.0
        most = self.cfg.max_batch_requests if self.cfg.batching else 1
        while True:
            first = await self._queue.get()
            batch, cands = [first], len(first.candidates)
            deadline = loop.time() + window
            while len(batch) < most and cands < self.cfg.max_batch_candidates:
                # wait for more only while other requests are on their way (received, not yet
                # queued): a request that is alone is not held back by the window
                if self._queue.empty() and self.arriving <= 0:
                    break
                timeout = deadline - loop.time()
                try:
                    job = self._queue.get_nowait() if timeout <= 0 else \
                        await asyncio.wait_for(self._queue.get(), timeout)
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
                batch.append(job)
                cands += len(job.candidates)
            try:
                await loop.run_in_executor(self._pool, self._run, batch)
            except BaseException as e:  # noqa: BLE001 - a failed batch fails its requests only
                for job in batch:
                    job.error = job.error or e
            for job in batch:
                if not job.future.done():
                    if job.error is not None:
                        job.future.set_exception(job.error)
                    else:
                        job.future.set_result((job.result, job.state))
                self._queue.task_done()

    def _run(self, batch: list[_Job]) -> None:
        t0 = time.perf_counter()
        try:
            self._score_batch(batch)
        finally:
            self.metrics.engine.observe(time.perf_counter() - t0)

    def _score_batch(self, batch: list[_Job]) -> None:
        """On the engine thread: check each request, look its user up, encode the missing users
        in one call (each distinct history once), score every candidate in one call."""
        e, m = self.engine, self.metrics
        keyed: list[tuple[_Job, str, dict]] = []
        ids: dict[int, Any] = {}  # each request's candidates, encoded once
        for job in batch:
            try:
                arrays = e.history_arrays(job.history, job.user_id)
                ids[id(job)] = e.encode_items(job.candidates, job.strict)  # errors before work
            except InputError as err:
                job.error = err
                continue
            key = state_key("srp4ctr", e.fingerprint, job.user_id, history_version(arrays))
            keyed.append((job, key, arrays))
        caches: dict[str, Any] = {}
        missing: dict[str, tuple[dict, Any]] = {}
        for job, key, arrays in keyed:
            if key in caches or key in missing:
                job.state = "shared"
                continue
            before = self.store.errors
            t0 = time.perf_counter()
            c = self.store.get(key)
            m.store.labels("get").observe(time.perf_counter() - t0)
            if c is not None:
                caches[key], job.state = c, "hit"
                m.state.labels("hit").inc()
            else:
                missing[key] = (arrays, job.user_id)
                job.state = "encoded"
                m.state.labels("error" if self.store.errors > before else "encoded").inc()
        if missing:
            keys = list(missing)
            new = e.encode_arrays([missing[k][0] for k in keys], [missing[k][1] for k in keys])
            self.encoded += len(new)
            for k, c in zip(keys, new):
                caches[k] = c
                t0 = time.perf_counter()
                self.store.put(k, c)
                m.store.labels("put").observe(time.perf_counter() - t0)
        if not keyed:
            return
        jobs = [j for j, _, _ in keyed]
        probs = e.score_many_ids([caches[k] for _, k, _ in keyed], [ids[id(j)] for j in jobs])
        m.batch_requests.observe(len(jobs))
        m.batch_candidates.observe(sum(len(j.candidates) for j in jobs))
        for job, p in zip(jobs, probs):
            job.result = p.detach().float().cpu().numpy()


# ------------------------------------------------------------------------------------------
# the HTTP layer


# the request and response bodies (the OpenAPI schema at /docs)
Id = StrictInt | StrictStr


class HistoryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: list[Id] = Field(description="raw item ids of the user's interactions (the "
                              "dataset's own ids), any order")
    timestamp: list[StrictInt | StrictFloat | StrictStr] = Field(
        description="unix seconds (or ISO date-times where the dataset took those), one "
                    "per interaction")
    rating: list[StrictInt | StrictFloat | StrictStr] | None = Field(
        None, description="the behaviour value of MovieLens-style data (one per "
                          "interaction)")
    behavior: list[StrictStr] | None = Field(
        None, description="the behaviour value of Taobao-style data: pv, cart, fav, buy")


class ScoreIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Id | None = Field(None, description="raw user id: its features (age, gender, "
                               "...) are used and it keys the user-state store; absent: no "
                               "user features")
    history: HistoryIn = Field(description="the user's raw behaviour; may be empty")
    candidates: list[Id] = Field(description="raw item ids to score; may be empty")
    strict: bool = Field(False, description="unknown candidate ids are an error (400) "
                         "instead of being scored as the out-of-vocabulary item")


class ScoreOut(BaseModel):
    probabilities: list[float] = Field(description="click probabilities, in the order of "
                                       "candidates")
    model: str = Field(description="the model's fingerprint (sha256 of its weights)")
    backend: str = Field(description="the engine's scoring backend")
    user_state: str = Field(description="where the user state came from: hit (the store), "
                            "encoded (this request), shared (another request of the same "
                            "batch)")


class ScoreManyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests: list[ScoreIn] = Field(description="one entry per user")


class ScoreManyOut(BaseModel):
    results: list[ScoreOut]


class ErrorOut(BaseModel):
    error: str = Field(description="the error's class (InputError, UnknownItemError, ...)")
    detail: Any = Field(description="what is wrong, as the engine says it")


class _BodyLimit:
    """ASGI middleware: refuse bodies larger than ``limit`` bytes with 413 (by Content-Length
    and while reading), before the app parses them."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > self.limit:
                return await self._refuse(send)
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return msg

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps({"error": "PayloadTooLarge",
                           "detail": f"request body larger than {self.limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _Observe:
    """ASGI middleware (plain, not ``BaseHTTPMiddleware``: no extra task per request) that
    counts and times the scoring requests by endpoint and status, and tells the service how
    many requests are arriving (received, not yet queued) so that its batch window waits only
    when others are on their way."""

    def __init__(self, app, metrics: Metrics, state: dict):
        self.app, self.metrics, self.state = app, metrics, state

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        s = self.state.get("service")
        if scope["type"] != "http" or not path.startswith("/v1/") or s is None:
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500
        scope.setdefault("state", {})
        s.arriving += 1
        s.in_flight += 1

        async def sent(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, sent)
        finally:
            s.in_flight -= 1
            if not scope["state"].get("queued"):
                s.arriving -= 1
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - t0)


class _TooLarge(Exception):
    pass


class _HTTPError(Exception):
    def __init__(self, status: int, error: str, detail: Any):
        self.status, self.error, self.detail = status, error, detail


def create_app(engine=None, cfg: ServerConfig | None = None, store: StateStore | None = None):
    """The FastAPI app of ``engine`` (default: ``Engine.load(cfg.model, ...)`` at start-up)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response

    cfg = cfg or ServerConfig()
    metrics = Metrics()
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        eng = engine
        if eng is None:
            from srp4ctr.engine import Engine

            eng = await asyncio.to_thread(
                Engine.load, cfg.model, backend=cfg.backend,
                **({"threads": cfg.threads} if cfg.threads else {}), **cfg.engine_options)
        service = ScoringService(eng, cfg, store or make_store(cfg), metrics)
        await service.start()
        state["service"] = service
        log.info("srp4ctr serve: ready (%s)", eng)
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="srp4ctr", version=_version(), lifespan=lifespan,
                  description="Click probabilities of candidate items for a user's raw "
                  "behaviour history, from a fine-tuned SRP4CTR model.")
    app.state.metrics = metrics
    app.state.srp4ctr = state
    errors = {400: {"model": ErrorOut}, 413: {"model": ErrorOut}, 422: {"model": ErrorOut},
              503: {"model": ErrorOut}}

    @app.exception_handler(_HTTPError)
    async def _http_error(request: Request, exc: _HTTPError):
        return JSONResponse({"error": exc.error, "detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        detail = [{"loc": list(e.get("loc", [])), "msg": e.get("msg")} for e in exc.errors()]
        return JSONResponse({"error": "InvalidRequest", "detail": detail}, status_code=422)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error")
        return JSONResponse({"error": "InternalError", "detail": "internal error (logged)"},
                            status_code=500)

    app.add_middleware(_Observe, metrics=metrics, state=state)

    def service() -> ScoringService:
        s = state.get("service")
        if s is None or not s.ready:
            raise _HTTPError(503, "NotReady", "the model is loading")
        return s

    def check_limits(req) -> None:
        if len(req.candidates) > cfg.max_candidates:
            raise _HTTPError(413, "PayloadTooLarge", f"{len(req.candidates)} candidates, the "
                             f"limit is {cfg.max_candidates}")
        n = max(len(req.history.item_id), len(req.history.timestamp))
        if n > cfg.max_history:
            raise _HTTPError(413, "PayloadTooLarge", f"{n} history interactions, the limit is "
                             f"{cfg.max_history}")

    def history_dict(req) -> dict:
        h = req.history
        d: dict[str, Any] = {"item_id": h.item_id, "timestamp": h.timestamp}
        if h.rating is not None:
            d["rating"] = h.rating
        if h.behavior is not None:
            d["behavior"] = h.behavior
        return d

    async def score_one(s: ScoringService, req) -> dict:
        try:
            probs, where = await s.score(history_dict(req), req.user_id, req.candidates,
                                         req.strict)
        except InputError as e:
            raise _HTTPError(400, type(e).__name__, str(e)) from None
        return {"probabilities": probs.tolist(), "model": s.engine.fingerprint,
                "backend": s.engine.backend, "user_state": where}

    # The scoring bodies are parsed and validated by pydantic-core straight from the bytes, and
    # the responses written as JSON bytes, not through FastAPI's body parameter and response
    # model (json.loads + validation + dependency solving, then validating the response
    # against its model): the same rules and messages at a fraction of the cost. The models
    # still document both in the OpenAPI schema (``_document_bodies``).
    @app.post("/v1/score", response_model=ScoreOut, responses=errors,
              openapi_extra=_body_ref(ScoreIn))
    async def score(request: Request):
        """Click probabilities of ``candidates`` for the user of ``history``."""
        req = _parse(ScoreIn, await request.body())
        check_limits(req)
        s = service()
        request.state.queued = True  # the service counts it from here (ScoringService.score)
        return _json(await score_one(s, req))

    @app.post("/v1/score_many", response_model=ScoreManyOut, responses=errors,
              openapi_extra=_body_ref(ScoreManyIn))
    async def score_many(request: Request):
        """:func:`score` for several users in one request (every one is checked first; one bad
        entry fails the request with its index)."""
        req = _parse(ScoreManyIn, await request.body())
        if len(req.requests) > cfg.max_users:
            raise _HTTPError(413, "PayloadTooLarge", f"{len(req.requests)} users, the limit is "
                             f"{cfg.max_users}")
        for r in req.requests:
            check_limits(r)
        s = service()
        s.arriving += len(req.requests) - 1  # its users arrive together: batch them
        request.state.queued = True  # each user is counted off as it is queued
        outs = await asyncio.gather(*(score_one(s, r) for r in req.requests),
                                    return_exceptions=True)
        for i, o in enumerate(outs):
            if isinstance(o, _HTTPError):
                raise _HTTPError(o.status, o.error, f"requests[{i}]: {o.detail}")
            if isinstance(o, BaseException):
                raise o
        return _json({"results": outs})

    @app.get("/healthz")
    async def healthz():
        """The process answers."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorOut}})
    async def readyz():
        """The model is loaded and warmed (503 until then, and while shutting down)."""
        s = service()
        return {"status": "ready", "model": s.engine.fingerprint, "backend": s.engine.backend,
                "store": s.store.stats(), "batching": cfg.batching,
                "queue": {"in_flight": s.in_flight, "queued": s._queue.qsize(),
                          "arriving": s.arriving, "encoded_users": s.encoded}}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        """Prometheus metrics: requests by endpoint and status, latency histograms, users and
        candidates per engine call, user states by origin (store hit, encoded, store error)."""
        body, ctype = metrics.text()
        return Response(body, media_type=ctype)

    app.add_middleware(_BodyLimit, limit=cfg.max_body_bytes)
    _document_bodies(app, (ScoreIn, ScoreManyIn))
    return app


def _parse(model: type[BaseModel], body: bytes) -> BaseModel:
    """``body`` validated as ``model``; a body that is not JSON or does not fit is the 422 of
    FastAPI's own validation (the same ``loc``, under ``body``)."""
    from fastapi.exceptions import RequestValidationError

    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]) \
            from None


def _json(content: Any):
    from fastapi.responses import Response

    return Response(json.dumps(content, separators=(",", ":")).encode(),
                    media_type="application/json")


def _body_ref(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _document_bodies(app, models) -> None:
    """Add the request-body models (which the handlers parse themselves) to the app's OpenAPI
    components, so that ``/docs`` and ``/openapi.json`` describe every field."""
    base = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = base()
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(js.pop("$defs", {}))
                comps[model.__name__] = js
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _version() -> str:
    from srp4ctr import __version__

    return __version__


def app_from_env():
    """The app of the :class:`ServerConfig` in ``$SRP4CTR_SERVE_CONFIG`` (uvicorn's factory for
    ``srp4ctr serve --workers N``: each worker process loads the model itself)."""
    return create_app(cfg=ServerConfig.from_json(os.environ[CONFIG_ENV]))
