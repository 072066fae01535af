"""``fedsocial serve RUN_DIR --partner ID --port P``: one partner's recommendation service (FastAPI on uvicorn).

Routes (the OpenAPI schema at ``/openapi.json`` is the contract; ``/docs`` renders it):

* ``GET /health``
* ``GET /users/{user}/recommendations?k=10[&category=C]`` -> ``{"user", "items": [{"item", "score",
  "probability", "explanation"}], "calibration"}`` (the calibration served, with its reason where privacy chose it)
* ``GET /users/{user}`` (the user's items and friends), ``GET /users?prefix=&limit=`` (find a user)
* ``POST /events``: one event object or a list: ``{"user", "item", "type": view|click|purchase|rating}``
  or ``{"user", "neighbour", "type": follow|unfollow}``; an unknown user is created; events change the
  user's list at once and are appended (fsync) to ``STATE_DIR/events.jsonl`` for the next rounds;
  at most ``MAX_EVENTS`` events and ``MAX_BODY_BYTES`` bytes a request (413 beyond)
* ``GET /social`` (communities, influencers, social share; cached until the next event)
* ``GET /``: the operator's page (``serve_page.html``, one static file, no external resources)

Bad requests get a 4xx with a one-line ``detail``; handlers catch everything else, so a client never
sees a traceback. Requests are handled on the event loop, one at a time (the model state is mutated
by events; a top-10 takes milliseconds). Bind to 127.0.0.1 (the default) and put the partner's own
gateway (TLS, authentication) in front: docs/SERVING.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from fedsocial.shared.events import EventError, parse_event
from fedsocial.shared.serving import MAX_K, Recommender, ServingError, UnknownUserError

log = logging.getLogger("fedsocial.serve")
PAGE = Path(__file__).with_name("serve_page.html")
MAX_EVENTS = 10_000  # per request
MAX_BODY_BYTES = 8 << 20  # per request: MAX_EVENTS events of ordinary ids fit several times over
SOCIAL_MAX_USERS = 1000  # the analysis scores one list per user: a seeded sample of a large partner


def compute_health(rec: Recommender, partner_id: str) -> dict[str, Any]:
    """``GET /health``: counts, and what the run's privacy let serving use: the scope, what cold users are
    ranked by (``dp_release``, ``item_biases`` or exact ``training_counts``), the calibration and its reason, and the
    catalogue's categories (names where items.csv names them, else codes) that ``category`` takes."""
    return {"status": "ok", "partner": partner_id, "users": len(rec.users), "items": len(rec.items),
            "privacy_scope": rec.privacy_scope, "cold_start": rec.cold_source, "ranking": rec.ranking,
            "calibration": rec.calibrator.to_json(), "categories": rec.category_labels()}


SECURITY_HEADERS = {  # on every reply: no framing (clickjacking), no sniffing, nothing loaded from elsewhere
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' "
                               "'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'self'",
}


def compute_allowed_hosts(host: str) -> frozenset[str]:
    """The Host names the service answers to: the address it binds and, bound to the loopback, its usual names.
    A DNS-rebinding page reaches the service under its own name, which is not among them."""
    names = {host.strip("[]").lower()}
    if names & {"127.0.0.1", "localhost", "::1"}:
        names |= {"127.0.0.1", "localhost", "::1"}
    return frozenset(names)


def _hostname(value: str) -> str:
    from urllib.parse import urlsplit

    try:
        return (urlsplit(value if "//" in value else f"//{value}").hostname or "").lower()
    except ValueError:
        return ""


def create_app(rec: Recommender, partner_id: str = "", allowed_hosts: frozenset[str] | None = None) -> FastAPI:
    """The FastAPI application over one :class:`Recommender`.

    ``allowed_hosts`` (``fedsocial serve`` passes :func:`compute_allowed_hosts` of its ``--host``): requests whose
    ``Host`` is another name, and posts whose ``Origin`` is another site, are refused (DNS rebinding, cross-site
    requests from a page the operator visits); None answers any (library use, tests). ``POST /events`` takes only
    ``application/json``, which a cross-site page cannot send without a CORS preflight this service never grants.
    The interactive ``/docs`` and ``/redoc`` pages are off: they load scripts from a CDN (``/openapi.json`` stays)."""
    app = FastAPI(title="fedsocial partner recommendations", version="1", docs_url=None, redoc_url=None,
                  description="One partner's served model: lists, explanations, events, social analysis.")
    cache: dict[str, Any] = {}

    @app.middleware("http")
    async def _guard(request: Request, call_next: Any) -> Any:
        if allowed_hosts is not None:
            if _hostname(request.headers.get("host", "")) not in allowed_hosts:
                return JSONResponse({"detail": "Host: not a name this service answers to"}, status_code=400,
                                    headers=SECURITY_HEADERS)
            origin = request.headers.get("origin")
            if request.method not in ("GET", "HEAD") and origin is not None and _hostname(origin) not in allowed_hosts:
                return JSONResponse({"detail": "Origin: a request from another site is refused"}, status_code=403,
                                    headers=SECURITY_HEADERS)
        try:
            response = await call_next(request)
        except Exception as exc:  # a bug: answered here, inside the headers, and logged once (was: Starlette's
            log.exception("internal error")  # outer handler, without the security headers, and a second traceback)
            return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500,
                                headers=SECURITY_HEADERS)
        response.headers.update(SECURITY_HEADERS)
        return response

    def error(status: int, detail: str) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(UnknownUserError)
    async def _unknown(_: Request, exc: UnknownUserError) -> JSONResponse:
        return error(404, str(exc))

    @app.exception_handler(ServingError)
    async def _serving(_: Request, exc: ServingError) -> JSONResponse:
        return error(422, str(exc))

    @app.exception_handler(EventError)
    async def _event(_: Request, exc: EventError) -> JSONResponse:
        return error(422, str(exc))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:  # a bug, not the client's fault
        log.exception("internal error")
        return error(500, f"internal error: {type(exc).__name__}")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return compute_health(rec, partner_id)

    @app.get("/users/{user:path}/recommendations")  # :path: an id may hold "/" (the data allows any string)
    async def recommendations(user: str, k: int = Query(10, ge=1, le=MAX_K),
                              category: str | None = Query(None, max_length=1024),
                              explain: bool = True) -> dict[str, Any]:
        t0 = time.perf_counter()
        items = rec.recommend(user, k, category=category, explain=explain)
        return {"user": rec.users[rec.index_of(user)], "items": items, "calibration": rec.calibrator.to_json(),
                "elapsed_ms": (time.perf_counter() - t0) * 1e3}

    @app.get("/users/{user:path}")
    async def profile(user: str) -> dict[str, Any]:
        return rec.user_profile(user)

    @app.get("/users")
    async def find_users(prefix: str = "", limit: int = Query(20, ge=1, le=1000)) -> dict[str, Any]:
        found = [u for u in rec.users if str(u).startswith(prefix)][:limit]
        return {"users": found, "total": len(rec.users)}

    @app.post("/events", response_model=None)
    async def events(request: Request) -> dict[str, Any] | JSONResponse:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":  # a form or text/plain post needs no preflight: cross-site forgery (review)
            return error(415, f"content-type: expected application/json, got {kind or 'none'!r}; nothing applied")
        try:
            raw = await read_body(request, MAX_BODY_BYTES)
        except ClientDisconnect:  # gone mid-body (found in review: logged as an internal error, twice)
            log.info("POST /events: the client disconnected before its body was complete; nothing applied")
            return error(400, "body: the client disconnected before the body was complete; nothing applied")
        if raw is None:
            return error(413, f"body: larger than {MAX_BODY_BYTES} bytes; send at most {MAX_EVENTS} events "
                              "per request")
        try:
            body = json.loads(raw)
        except RecursionError:
            return error(400, "body: not valid JSON (nested too deeply)")
        except ValueError as exc:  # JSON syntax, not UTF-8, or an integer of more digits than Python converts
            return error(400, f"body: not valid JSON ({exc})")
        docs = body if isinstance(body, list) else [body]
        if not docs or len(docs) > MAX_EVENTS:
            return error(422, f"body: expected one event or a list of 1..{MAX_EVENTS} events")
        parsed = [parse_event(d, where=f"event #{n}: " if isinstance(body, list) else "") for n, d in enumerate(docs)]
        result = rec.apply_events(parsed)
        cache.clear()
        return result

    @app.get("/social")
    async def social(k: int = Query(10, ge=1, le=100)) -> dict[str, Any]:
        from fedsocial.shared.social_analysis import analyse

        if cache.get("k") != k:
            cache.update(k=k, doc=analyse(rec, k=k, max_users=SOCIAL_MAX_USERS))
        return cache["doc"]  # type: ignore[no-any-return]

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    return app


def compute_port(text: str) -> int:
    """``--port``: an integer in 1..65535 (uvicorn waited forever on 99999999 instead of failing)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 1..65535, got {port}")
    return port


async def read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None when it exceeds ``limit`` bytes. Past the limit the rest is read and
    dropped as it arrives (memory stays bounded, and the client, still sending, gets the reply instead of
    a reset connection)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif chunks:
            chunks.clear()
    return b"".join(chunks) if size <= limit else None


def check_port_free(host: str, port: int) -> None:
    """Refuse, as a user error naming the address, a port another process holds or a host that is not local."""
    import socket

    from fedsocial.shared.config import ConfigError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(f"--host {host}: cannot be resolved ({exc})") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(addr)
        except OSError as exc:
            raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                              "is another service on it? choose another --port") from None


def main(argv: list[str] | None = None) -> int:
    from fedsocial.simulations.common import compute_error_line
    from fedsocial.simulations.recommend import (
        SERVING_ERRORS,
        add_source_arguments,
        describe_calibration,
        load_recommender,
        source_from_args,
    )

    parser = argparse.ArgumentParser(prog="fedsocial serve", description=__doc__.splitlines()[0])
    add_source_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: loopback only)")
    parser.add_argument("--port", type=compute_port, default=8000, help="TCP port, 1..65535 (default 8000)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--event-refit", default="async", choices=("sync", "async", "off"),
                        help="the local p_u refit after an event: on a worker thread (default), before the "
                        "reply, or only at the next start")
    args = parser.parse_args(argv)
    try:
        check_port_free(args.host, args.port)  # before the model loads, not after a "serving" line
        import torch

        torch.set_num_threads(max(1, args.threads))
        rec = load_recommender(source_from_args(args), args.calibration, refit_on_event=args.event_refit)
    except SERVING_ERRORS as exc:
        print(f"error: {compute_error_line(exc)}", file=sys.stderr)
        return 2
    import uvicorn

    print(f"serving {args.partner}: {len(rec.users)} users, {len(rec.items)} items on http://{args.host}:{args.port}/; "
          f"{describe_calibration(rec)}", flush=True)
    uvicorn.run(create_app(rec, args.partner, compute_allowed_hosts(args.host)), host=args.host, port=args.port,
                log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
