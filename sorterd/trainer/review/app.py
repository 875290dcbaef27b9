"""The review page's HTTP server (aiohttp): one static page and a JSON API over `LabelStore`.

    GET  /                                the page (static/index.html, app.js, style.css; no CDN)
    GET  /api/queue?annotator=NAME&limit=N[&mode=label|gold|spot]   stones, highest priority first
    GET  /api/stone/<id>                  one stone's queue line (+ image URLs)
    GET  /images/<kind>/<id>.png          kind: backlit_crop, toplit_crop, backlit_full, toplit_full
    POST /api/labels                      {"stone_id", "annotator", "color", "clarity", "uncertain",
                                          "mixed", "damaged", "reject", "notes"[, "check": "spot"]}
                                          -> 201 with the stored §3.4 line
    POST /api/undo                        {"annotator"} -> the withdrawn label
    GET  /api/counts                      §3.5 class distribution and the queue length
    GET  /api/agreement                   §3.3 κ per head, disagreements;  POST /api/gold chooses the gold set
    GET  /api/spot                        §3.5 spot round report;  POST /api/spot {"annotator"} starts one
    GET  /api/retrain, POST /api/retrain  {"reason"}: `sorterd.trainer.retrain` (503 while it is absent)
    GET  /reports/<path>                  files under DIR/models/ and DIR/reports/ (the retrain logs)

What the page shows of `read_status(root)` (every key optional; others are ignored): "state"
(str), "progress" (0..1), "epoch", "epochs", "eta_s", "new_labels", "message", and "log_url" /
"report_url" (links, e.g. /reports/models/model_log.jsonl for a file under DIR/models or
DIR/reports).  POST answers 202 with `request_run(root, reason)`'s dict.

Bad input is a 4xx with ``{"error": "<what was wrong and what is allowed>"}`` and changes nothing.
Every store call does file I/O and runs in a worker thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from sorterd.trainer.labels import LabelError, LabelStore

STATIC = Path(__file__).parent / "static"
IMAGE_KINDS = ("backlit_crop", "toplit_crop", "backlit_full", "toplit_full")
MAX_LIMIT = 1000
MAX_BODY = 64 * 1024  # a label is < 3 kB; notes are capped at 2000 characters
REPORT_DIRS = ("models", "reports", "retrain")  # retrain/runs/<run>/: the runner's logs and reports
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
STORE: web.AppKey[LabelStore] = web.AppKey("store", LabelStore)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """LabelError -> its 4xx; aiohttp's own 4xx (404, 405, 413) -> the same JSON shape."""
    try:
        return await handler(request)
    except LabelError as exc:
        return error(exc.status, str(exc))
    except web.HTTPException as exc:
        if exc.status >= 400 and request.path.startswith(("/api/", "/images/")):
            return error(exc.status, f"{request.method} {request.path}: {exc.reason}")
        raise


def make_app(root: Path) -> web.Application:
    """The review app for the §7.1 dataset at `root` (LabelError when it is not a folder)."""
    app = web.Application(middlewares=[errors_as_json], client_max_size=MAX_BODY)
    app[STORE] = LabelStore(root)
    app.add_routes([
        web.get("/", index),
        web.get("/api/queue", queue),
        web.get("/api/stone/{stone_id}", stone),
        web.get("/images/{kind}/{name}", image),
        web.post("/api/labels", add_label),
        web.post("/api/undo", undo),
        web.get("/api/counts", counts),
        web.get("/api/agreement", agreement),
        web.post("/api/gold", make_gold),
        web.get("/api/spot", spot),
        web.post("/api/spot", make_spot),
        web.get("/api/retrain", retrain_status),
        web.post("/api/retrain", retrain_now),
        web.get("/reports/{path:.+}", report_file),
        web.static("/static", STATIC),
    ])
    return app


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html")


def _with_urls(q: dict[str, Any]) -> dict[str, Any]:
    keys = ("stone_id", "sorter_id", "lot_id", "session_id", "size_mm", "p_color", "p_clarity", "priority",
            "uncertainty", "boosts", "predicted", "decision", "model_version", "reason")
    out = {k: q.get(k) for k in keys}
    out["images"] = {kind: f"/images/{kind}/{q['stone_id']}.png" for kind in IMAGE_KINDS}
    return out


def _int_param(request: web.Request, name: str, default: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 1 <= value <= hi:
        raise LabelError(f"{name}={raw!r}: must be a whole number in 1..{hi}")
    return value


async def queue(request: web.Request) -> web.Response:
    store = request.app[STORE]
    limit = _int_param(request, "limit", 50, MAX_LIMIT)
    items = await asyncio.to_thread(store.queue, request.query.get("annotator"), limit,
                                    request.query.get("mode", "label"))
    return web.json_response({"items": [_with_urls(q) for q in items]})


async def stone(request: web.Request) -> web.Response:
    q = await asyncio.to_thread(request.app[STORE].stone, request.match_info["stone_id"])
    return web.json_response(_with_urls(q))


async def image(request: web.Request) -> web.StreamResponse:
    kind, name = request.match_info["kind"], request.match_info["name"]
    if kind not in IMAGE_KINDS:
        raise LabelError(f"image kind {kind!r}: allowed are {', '.join(IMAGE_KINDS)}", 404)
    if not name.endswith(".png") or not _ID.match(name[:-4]):
        raise LabelError(f"image {name!r}: must be <stone_id>.png", 404)
    path = await asyncio.to_thread(_image_path, request.app[STORE], kind, name)
    return web.FileResponse(path, headers={"Cache-Control": "max-age=3600"})


def _image_path(store: LabelStore, kind: str, name: str) -> Path:
    """Where the inbox put one of a stone's four PNGs (sorterd.trainer.inbox's layout)."""
    q = store.stone(name[:-4])
    mode, part = kind.split("_")
    if part == "crop":
        path = store.root / "images" / "processed" / mode / name
    else:
        path = store.root / "images" / "raw" / str(q.get("session_id", "")) / mode / name
    if not path.is_file():
        raise LabelError(f"{kind} of stone {name[:-4]} is missing on disk ({path})", 404)
    return path


async def _json_body(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LabelError(f"the body is not valid JSON ({exc}); send one JSON object") from None


async def add_label(request: web.Request) -> web.Response:
    body = await _json_body(request)
    record = await asyncio.to_thread(request.app[STORE].add, body)
    return web.json_response(record, status=201)


async def undo(request: web.Request) -> web.Response:
    body = await _json_body(request)
    annotator = body.get("annotator") if isinstance(body, dict) else None
    return web.json_response(await asyncio.to_thread(request.app[STORE].undo, annotator))


async def counts(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(request.app[STORE].counts))


async def agreement(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(request.app[STORE].agreement))


async def make_gold(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(request.app[STORE].make_gold), status=201)


async def spot(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(request.app[STORE].spot_report))


async def make_spot(request: web.Request) -> web.Response:
    body = await _json_body(request)
    annotator = body.get("annotator") if isinstance(body, dict) else None
    return web.json_response(await asyncio.to_thread(request.app[STORE].make_spot, annotator), status=201)


def _retrain_module() -> Any:
    try:
        return importlib.import_module("sorterd.trainer.retrain")
    except ModuleNotFoundError as exc:
        if exc.name != "sorterd.trainer.retrain":
            raise
        raise LabelError("retraining is not available in this build (sorterd.trainer.retrain is missing); "
                         "label on, and run `sorterd train --from` by hand", 503) from None


async def retrain_status(request: web.Request) -> web.Response:
    module = _retrain_module()
    root = request.app[STORE].root
    return web.json_response(page_status(root, await asyncio.to_thread(module.read_status, root)))


def page_status(root: Path, status: dict[str, Any]) -> dict[str, Any]:
    """The runner's `read_status` with what the page shows: progress (its fraction), a one-line
    message (why it ran, failed or was refused), and links to its report and the §5.5 log."""
    out = dict(status)
    if "fraction" in status and "progress" not in status:
        out["progress"] = status["fraction"]
    if "message" not in status:
        refused = status.get("refused")
        out["message"] = (status.get("error") or ("not a candidate: " + "; ".join(map(str, refused)) if refused else "")
                          or (f"candidate release: {status['candidate']}" if status.get("candidate") else "")
                          or str(status.get("reason") or ""))
    found = status.get("reports")
    reports: dict[str, Any] = found if isinstance(found, dict) else {}
    for key, names in (("report_url", ("report_html", "evaluate")), ("log_url", ("train_log",))):
        for name in names:
            url = _report_url(root, reports.get(name))
            if url and key not in out:
                out[key] = url
    return out


def _report_url(root: Path, path: object) -> str | None:
    """/reports/<path> for a file under one of REPORT_DIRS of the dataset, else None."""
    if not isinstance(path, str) or not path:
        return None
    try:
        rel = Path(path).resolve().relative_to(root.resolve())
    except ValueError:
        return None
    return f"/reports/{rel.as_posix()}" if rel.parts and rel.parts[0] in REPORT_DIRS else None


async def retrain_now(request: web.Request) -> web.Response:
    module = _retrain_module()
    body = await _json_body(request) if request.can_read_body else {}
    reason = body.get("reason", "requested on the review page") if isinstance(body, dict) else None
    if not isinstance(reason, str) or len(reason) > 200:
        raise LabelError(f"reason {reason!r}: must be a string of at most 200 characters")
    return web.json_response(await asyncio.to_thread(module.request_run, request.app[STORE].root, reason),
                             status=202)


async def report_file(request: web.Request) -> web.StreamResponse:
    root = request.app[STORE].root.resolve()
    rel = request.match_info["path"]
    path = (root / rel).resolve()
    if not any(path.is_relative_to(root / d) for d in REPORT_DIRS) or not path.is_file():
        raise LabelError(f"report {rel!r}: no such file under {', '.join(d + '/' for d in REPORT_DIRS)}", 404)
    return web.FileResponse(path)


async def start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0: any free port); returns the runner (cleanup() stops it) and the port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, int(runner.addresses[0][1])
