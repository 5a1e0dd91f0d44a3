"""The HTTP service behind ``qarm serve``: FastAPI over :class:`~qarm.serve.scorer.Scorer` and a live store.

Endpoints (OpenAPI at ``/docs``; ids are the dataset's ``source_id`` strings):

* ``POST /v1/rank``: scores of 1..1000 candidates for a user, one probability per task, in candidate
  order. An unknown user is a new user (empty history); an unknown item is a 404 naming the ids.
* ``POST /v1/items``: new uploads (one item or ``{"items": [...]}``) -> aligned vector, RQ and VQ codes,
  written to the live store; the next ``/v1/rank`` (in any worker sharing the store) can rank them.
* ``POST /v1/events``: interactions appended to the store's log; a positive of the primary task joins
  the user's history (and code-matching sequences) from the next request on.
* ``GET /healthz`` (the process answers), ``GET /readyz`` (a model is loaded and the store answers),
  ``GET /metrics`` (Prometheus text).

Hot reload: a thread polls ``MODELS_DIR/CURRENT``; a new version is loaded beside the serving one
(hash-checked, its codes version checked against the store's) and swapped in by replacing one
reference. A request reads that reference once, so it finishes on the version it started with; a
bundle that fails to load is refused with a log line and the old one keeps serving.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.exceptions import HTTPException as StarletteHTTPException

from qarm.distributed import resolve_device
from qarm.errors import QarmError
from qarm.serve.bundle import current_version, load_bundle
from qarm.serve.scorer import Scorer, UnknownItems, shared_text_model
from qarm.serve.store import Event, ItemUpload, LiveStore, open_live_store

logger = logging.getLogger("qarm.serve")

MAX_CANDIDATES = 1000
MAX_ITEMS = 1000
MAX_EVENTS = 10_000
Id = Annotated[str, StringConstraints(min_length=1, max_length=256)]


# ------------------------------------------------------------------------------------------- schemas

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RankContext(Strict):
    time: int | None = Field(None, ge=0, le=2**62, description="Score as of this time (the log's unit): only "
                             "events strictly before it form the history. Default: every event.")


class RankRequest(Strict):
    user_id: Id
    candidates: list[Id] = Field(min_length=1, max_length=MAX_CANDIDATES)
    context: RankContext | None = None


class RankResponse(BaseModel):
    model_version: str
    codes_version: str | None
    scores: list[dict[str, float | str]] = Field(description="One entry per candidate, in request order: "
                                                "item_id and one probability per task of the model.")


class ItemIn(Strict):
    item_id: Id
    text: str = Field("", max_length=20_000)
    vectors: dict[Annotated[str, StringConstraints(min_length=1, max_length=64)],
                  list[float]] | None = Field(None, description="Precomputed content vectors by modality, "
                                              "for the modalities the bundle's encoder reads.")
    category: Annotated[str, StringConstraints(max_length=256)] | None = None


class ItemBatch(Strict):
    items: list[ItemIn] = Field(min_length=1, max_length=MAX_ITEMS)


class ItemCodes(BaseModel):
    item_id: str
    ordinal: int = Field(description="Position in the live store's list of added items.")
    added: bool = Field(description="False when the id had been added before (its stored codes are returned).")
    rq: list[int]
    vq: list[str] = Field(description="The catalogue items (source ids) of the VQ code.")


class ItemsResponse(BaseModel):
    model_version: str
    codes_version: str | None
    items: list[ItemCodes]


class EventIn(Strict):
    user_id: Id
    item_id: Id
    time: int = Field(ge=0, le=2**62)
    labels: dict[Annotated[str, StringConstraints(min_length=1, max_length=64)], Annotated[int, Field(ge=0, le=1)]]


class EventBatch(Strict):
    events: list[EventIn] = Field(min_length=1, max_length=MAX_EVENTS)


class EventsResponse(BaseModel):
    accepted: int
    log_length: int
    positives: int


# --------------------------------------------------------------------------------------------- state

class Metrics:
    """The service's Prometheus metrics, in a registry of its own (several apps may live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("qarm_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("qarm_request_seconds", "Request latency (seconds)", ["endpoint"],
                                 buckets=(.001, .002, .005, .0075, .01, .015, .02, .03, .05, .075, .1, .25, .5, 1, 2.5,
                                          5), registry=self.registry)
        self.model = Info("qarm_model", "The serving bundle", registry=self.registry)
        self.items_added = Counter("qarm_items_added", "Items added through /v1/items", registry=self.registry)
        self.events_added = Counter("qarm_events_added", "Events appended through /v1/events", registry=self.registry)
        self.reloads = Counter("qarm_reloads", "Bundle reloads", ["outcome"], registry=self.registry)
        self.catalogue = Gauge("qarm_items_known", "Items the serving scorer knows", ["kind"], registry=self.registry)


class Service:
    """What the app serves: the current :class:`Scorer` (replaced whole on reload or new items), the live
    store, and the reload thread."""

    def __init__(self, models_dir: str | Path, store: LiveStore, *, reload_interval: float = 1.0,
                 text_model: Any = None, warm_encoder: bool = True, device: str = "cpu") -> None:
        self.models_dir = Path(models_dir)
        self.device = device
        self.store = store
        self.reload_interval = reload_interval
        self.metrics = Metrics()
        self._text_model = text_model
        self._lock = threading.Lock()  # serialises replacing the scorer (new items, reload)
        self._refused: str | None = None
        version = current_version(self.models_dir)
        if version is None:
            raise QarmError(f"{self.models_dir}: no current bundle (run `qarm export RUN_DIR --to {self.models_dir}`)")
        self.scorer = self._load(version)
        self._publish()
        if warm_encoder:
            self.scorer.codebooks.encoder()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _load(self, version: str) -> Scorer:
        bundle = load_bundle(self.models_dir / "versions" / version)
        if bundle.codes_version is not None:
            self.store.bind(bundle.codes_version)
        return Scorer(bundle, self.store.items_since(0), text_model=shared_text_model(self._text_model),
                      device=self.device)

    def _publish(self) -> None:
        s = self.scorer
        self.metrics.model.info({"model_version": s.version, "codes_version": str(s.codes_version), "model":
                                 str(s.bundle.manifest["model"])})
        self.metrics.catalogue.labels("catalogue").set(s.n_catalogue)
        self.metrics.catalogue.labels("added").set(s.n_added)

    # -- items added by any process --------------------------------------------------------------

    def sync_items(self) -> Scorer:
        """The scorer, grown by the items other processes (or requests) added to the store since."""
        with self._lock:
            scorer = self.scorer
            fresh = self.store.items_since(scorer.n_added)
            if fresh:
                scorer = scorer.with_items(fresh)
                self.scorer = scorer
                self._publish()
            return scorer

    # -- hot reload ------------------------------------------------------------------------------

    def reload_if_changed(self) -> bool:
        """Load and swap in the current version if it changed; True when swapped."""
        version = current_version(self.models_dir)
        if version is None or version == self.scorer.version or version == self._refused:
            return False
        start = time.perf_counter()
        try:
            scorer = self._load(version)
        except Exception as exc:  # a broken bundle must never stop the serving one
            self._refused = version
            self.metrics.reloads.labels("refused").inc()
            logger.error("reload: bundle %s refused, still serving %s: %s", version, self.scorer.version, exc)
            return False
        with self._lock:
            fresh = self.store.items_since(scorer.n_added)
            if fresh:
                scorer = scorer.with_items(fresh)
            old, self.scorer = self.scorer.version, scorer
            self._publish()
        self._refused = None
        self.metrics.reloads.labels("swapped").inc()
        logger.info("reload: %s -> %s in %.2f s", old, version, time.perf_counter() - start)
        return True

    def start(self) -> None:
        if self.reload_interval <= 0 or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="qarm-reload", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _watch(self) -> None:
        while not self._stop.wait(self.reload_interval):
            try:
                self.reload_if_changed()
            except Exception:  # keep watching whatever happens
                logger.exception("reload: unexpected error")


# ----------------------------------------------------------------------------------------------- app

class _Measure:
    """Requests and latency per endpoint (pure ASGI: Starlette's ``BaseHTTPMiddleware`` costs more per
    request than a 200-candidate ranking's JSON)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            endpoint = getattr(scope.get("route"), "path", "other")
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
            self.metrics.requests.labels(endpoint, str(status[0])).inc()


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": {"message": message, **extra}})


def create_app(models_dir: str | Path, store: LiveStore | str | Path | None = None, *, reload_interval: float = 1.0,
               text_model: Any = None, warm_encoder: bool = True, device: str = "cpu") -> FastAPI:
    """The FastAPI app serving ``models_dir``'s current bundle.

    ``store``: a :class:`LiveStore`, a URL / path for :func:`open_live_store`, or None for
    ``models_dir/live.sqlite``. The reload thread starts with the app (lifespan) and stops with it.
    ``device``: ``cpu``, ``cuda`` or ``auto`` (:func:`qarm.distributed.resolve_device`), where the
    ranking model runs.
    """
    models_dir = Path(models_dir)
    where = str(resolve_device(device))
    live = store if isinstance(store, LiveStore) else open_live_store(store or models_dir / "live.sqlite")
    service = Service(models_dir, live, reload_interval=reload_interval, text_model=text_model,
                      warm_encoder=warm_encoder, device=where)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(title="qarm", version="1", lifespan=lifespan,
                  description="QARM ranking service: scores, new uploads' codes, live events.")
    app.state.service = service
    metrics = service.metrics

    app.add_middleware(_Measure, metrics=metrics)

    @app.post("/v1/rank", response_model=RankResponse, responses={404: {"description": "Unknown candidate ids"}})
    async def rank(request: RankRequest) -> Response:
        """Scores of the candidates for the user, one probability per task, in candidate order."""
        # Scored on the event loop, not in the thread pool: the work is CPU-bound and a few ms, and threads
        # that take turns on the GIL (each with its own torch threads) served 30% fewer requests a second.
        scorer = service.scorer
        try:
            scorer.dense_items(request.candidates)
        except UnknownItems:
            scorer = service.sync_items()  # added by another worker since?
        live = service.store.user_positives(request.user_id, scorer.history_length)
        as_of = request.context.time if request.context is not None else None
        try:
            probs = scorer.score(request.user_id, request.candidates, live=live, as_of=as_of)
        except UnknownItems as exc:
            return _error(404, str(exc), field="candidates", unknown_item_ids=exc.ids[:100])
        tasks = scorer.tasks
        scores = [{"item_id": item, **{t: float(p) for t, p in zip(tasks, row)}}
                  for item, row in zip(request.candidates, probs.tolist())]
        body = {"model_version": scorer.version, "codes_version": scorer.codes_version, "scores": scores}
        return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")

    @app.post("/v1/items", response_model=ItemsResponse, responses={409: {"description": "A catalogue item id"}})
    def items(request: ItemIn | ItemBatch) -> ItemsResponse | JSONResponse:
        """Codes for new uploads (aligned encoder, frozen RQ codebooks, VQ catalogue), stored; rankable at once."""
        batch = request.items if isinstance(request, ItemBatch) else [request]
        ids = [it.item_id for it in batch]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:20]
            return _error(422, f"items: duplicate item_id in one request: {dup}", field="items.item_id")
        scorer = service.sync_items()
        catalogue = [i for i in ids if scorer.item_index.get(i, scorer.n_catalogue) < scorer.n_catalogue]
        if catalogue:
            return _error(409, f"item_id: {catalogue[:20]} are catalogue items of bundle {scorer.version}; an upload "
                          "is a new item", field="item_id", item_ids=catalogue[:100])
        modalities = sorted({m for it in batch for m in (it.vectors or {})})
        vectors: dict[str, np.ndarray] = {}
        for m in modalities:
            rows = [(it.vectors or {}).get(m) for it in batch]
            lacking = [it.item_id for it, r in zip(batch, rows) if r is None]
            if lacking:
                return _error(422, f"vectors.{m}: missing for items {lacking[:20]} (every item of a request needs "
                              "the same modalities)", field=f"vectors.{m}")
            lengths = {len(r) for r in rows if r is not None}
            if len(lengths) != 1:
                return _error(422, f"vectors.{m}: items have different lengths {sorted(lengths)}", field=f"vectors.{m}")
            arr = np.asarray(rows, dtype=np.float32)
            if not np.isfinite(arr).all():
                return _error(422, f"vectors.{m}: values must be finite", field=f"vectors.{m}")
            vectors[m] = arr
        try:
            aligned, vq, rq = scorer.encode_items([it.text for it in batch], vectors)
        except QarmError as exc:
            column = getattr(exc, "column", None) or "items"
            return _error(422, str(exc), field=column)
        uploads = [ItemUpload(it.item_id, aligned[i], vq[i], rq[i], it.category) for i, it in enumerate(batch)]
        before = service.store.n_items()
        stored = service.store.add_items(scorer.codes_version or "", uploads)
        added = sum(1 for s in stored if s.ordinal >= before)
        metrics.items_added.inc(added)
        scorer = service.sync_items()
        names = scorer.bundle.item_source_ids
        out = []
        for s in stored:
            vq_names = [str(names[c]) if 0 <= c < len(names) else _added_name(scorer, int(c)) for c in s.vq.tolist()]
            out.append(ItemCodes(item_id=s.source_id, ordinal=s.ordinal, added=s.ordinal >= before,
                                 rq=[int(c) for c in s.rq.tolist()], vq=vq_names))
        return ItemsResponse(model_version=scorer.version, codes_version=scorer.codes_version, items=out)

    @app.post("/v1/events", response_model=EventsResponse, responses={404: {"description": "Unknown item ids"}})
    def events(request: EventBatch) -> EventsResponse | JSONResponse:
        """Interactions appended to the live log; positives join the users' histories at once."""
        scorer = service.scorer
        items = [e.item_id for e in request.events]
        try:
            scorer.dense_items(items)
        except UnknownItems:
            scorer = service.sync_items()
            try:
                scorer.dense_items(items)
            except UnknownItems as exc:
                return _error(404, str(exc), field="events.item_id", unknown_item_ids=exc.ids[:100])
        tasks = set(scorer.tasks)
        primary = scorer.tasks[0]
        for i, e in enumerate(request.events):
            unknown = sorted(set(e.labels) - tasks)
            if unknown:
                return _error(422, f"events[{i}].labels: unknown tasks {unknown}; this model's tasks are "
                              f"{list(scorer.tasks)}", field=f"events.{i}.labels")
        logged = [Event(e.user_id, e.item_id, e.time, dict(e.labels), e.labels.get(primary) == 1)
                  for e in request.events]
        length = service.store.append_events(logged)
        metrics.events_added.inc(len(logged))
        return EventsResponse(accepted=len(logged), log_length=length, positives=sum(e.positive for e in logged))

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        scorer = service.scorer
        store_ok = service.store.ping()
        body = {"ready": store_ok, "store": service.store.describe(), "store_reachable": store_ok, **scorer.describe()}
        return JSONResponse(status_code=200 if store_ok else 503, content=body)

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(QarmError)
    async def qarm_error(request: Request, exc: QarmError) -> JSONResponse:
        return _error(422, str(exc), field=getattr(exc, "column", None) or "body")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # pydantic's errors, less the offending input (it may be a float JSON cannot write, or megabytes)
        errors = [{"loc": list(e.get("loc", ())) or ["body"], "msg": str(e.get("msg", "invalid")),
                   "type": str(e.get("type", "value_error"))} for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": errors or [{"loc": ["body"], "msg": "invalid request",
                                                                            "type": "value_error"}]})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.detail, dict):
            return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail})
        return _error(exc.status_code, str(exc.detail), field="body" if exc.status_code == 400 else "path")

    return app


def _added_name(scorer: Scorer, dense: int) -> str:
    ordinal = dense - scorer.n_catalogue
    if 0 <= ordinal < scorer.n_added:
        return scorer.added[ordinal].source_id
    raise HTTPException(500, f"VQ code {dense} is neither a catalogue nor an added item")


def app_from_env() -> FastAPI:
    """The app factory ``qarm serve`` hands to uvicorn (so that ``--workers N`` builds one per process):
    ``QARM_MODELS_DIR``, ``QARM_STORE`` (optional), ``QARM_RELOAD_INTERVAL`` (seconds), ``QARM_THREADS``,
    ``QARM_DEVICE`` (cpu, cuda or auto; default cpu)."""
    threads = os.environ.get("QARM_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return create_app(os.environ["QARM_MODELS_DIR"], os.environ.get("QARM_STORE") or None,
                      reload_interval=float(os.environ.get("QARM_RELOAD_INTERVAL", "1.0")),
                      device=os.environ.get("QARM_DEVICE", "cpu"))
