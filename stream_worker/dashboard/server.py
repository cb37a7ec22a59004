"""The dashboard's HTTP server: the page, its static files, a small JSON API, and auth.

A few dozen lines of HTTP/1.1 on asyncio streams (like the worker's health server), so the
dashboard needs no web framework. Every response closes its connection; the page polls the
API every couple of seconds, which is nothing for this. Nothing here blocks the loop: Redis is
read with the asyncio client and the static files are read into memory once, at start.

Routes: ``/`` (the page), ``/static/...``, ``/api/sources``, ``/api/stats``,
``/api/counts?source=&window=[&limit=]``, ``/api/thumb/<source>.jpg``, ``/healthz`` (the
server answers: a liveness probe) and ``/readyz`` (Redis answers too: a readiness probe; a
restart would not bring Redis back, so liveness does not depend on it).
Bound to a loopback address the dashboard needs no login; bound anywhere else it refuses to
start without a token, and then every route except the two probes wants
``Authorization: Bearer <token>`` or basic auth with the token as password (any user name),
which is what a browser's login prompt sends.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import json
import logging
import mimetypes
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from stream_worker.dashboard.live import MAX_WINDOWS, LiveView
from stream_worker.errors import ConfigError, LookoutError
from stream_worker.settings import Settings, redact_url

log = logging.getLogger("lookout.dashboard")

STATIC_DIR = Path(__file__).resolve().parent / "static"
REQUEST_TIMEOUT_S = 10.0
MAX_HEADER_LINES = 100
REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
# Everything the page needs is served from here; nothing inline, nothing from elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IPs; anything else (``0.0.0.0``, a name) is exposed."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def token_allows(token: str, authorization: str | None) -> bool:
    """Whether an ``Authorization`` header carries ``token`` (bearer, or basic-auth password).

    The comparison is constant-time, so response timing does not leak the token.
    """
    if not authorization:
        return False
    scheme, _, credentials = authorization.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer":
        offered = credentials.encode()
    elif scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials, validate=True)
        except (binascii.Error, ValueError):
            return False
        offered = decoded.partition(b":")[2]
    else:
        return False
    return hmac.compare_digest(offered, token.encode())


@dataclass(frozen=True, slots=True)
class Response:
    """One HTTP response."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: Mapping[str, str] = field(default_factory=dict)


def json_response(data: Any, status: int = 200) -> Response:
    """A JSON response that no cache keeps (the data is live)."""
    return Response(
        status,
        json.dumps(data, separators=(",", ":")).encode(),
        "application/json",
        {"Cache-Control": "no-store"},
    )


def text_response(status: int, text: str) -> Response:
    """A short plain-text response."""
    return Response(status, (text + "\n").encode())


def load_static(root: Path = STATIC_DIR) -> dict[str, tuple[bytes, str]]:
    """Every static file under ``root`` by URL path (``/static/app.js``), with its content type.

    Serving from this table, never from a path built out of the request, rules out traversal.
    """
    files: dict[str, tuple[bytes, str]] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            if ctype.startswith("text/") or ctype in ("application/javascript", "text/javascript"):
                ctype += "; charset=utf-8"
            files["/static/" + path.relative_to(root).as_posix()] = (path.read_bytes(), ctype)
    if "/static/index.html" not in files:
        raise ConfigError(f"the dashboard's page is missing from {root}: reinstall lookout")
    return files


class DashboardServer:
    """Serves the dashboard for one :class:`LiveView`."""

    def __init__(
        self,
        view: LiveView,
        *,
        token: str | None = None,
        on_stop: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if token is not None and not token:
            raise ConfigError("the dashboard token is empty: put the token in the --token-file")
        self._view = view
        self._token = token
        self._on_stop = on_stop
        self._static = load_static()
        self._server: asyncio.Server | None = None
        self.host = ""
        self.port = 0

    @property
    def url(self) -> str:
        """Where a browser on this machine finds the page."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)
        return f"http://{host}:{self.port}/"

    async def start(self, host: str, port: int) -> int:
        """Start listening; returns the bound port (useful with port 0).

        Refuses (``ConfigError``) to listen beyond loopback without a token.
        """
        if self._token is None and not is_loopback(host):
            raise ConfigError(
                f"the dashboard would be open to the network on {host} without a login: "
                "give --token-file (or bind --host 127.0.0.1)"
            )
        try:
            self._server = await asyncio.start_server(self._handle, host, port)
        except OSError as exc:
            raise ConfigError(f"the dashboard cannot listen on {host}:{port}: {exc.strerror}") from exc
        self.host, self.port = host, int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        """Stop listening and release what the server owns (its Redis client)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._on_stop is not None:
            await self._on_stop()
            self._on_stop = None

    async def respond(self, method: str, target: str, headers: Mapping[str, str]) -> Response:
        """The response to one request (``headers`` with lower-case names)."""
        if method not in ("GET", "HEAD"):
            return text_response(405, "only GET and HEAD")
        parts = urlsplit(target)
        path = parts.path
        if path == "/healthz":
            return text_response(200, "ok")
        if path == "/readyz":
            return await self._ready()
        if self._token is not None and not token_allows(self._token, headers.get("authorization")):
            return Response(
                401,
                b"login needed: bearer token or basic auth with the token as password\n",
                headers={"WWW-Authenticate": 'Basic realm="lookout dashboard", charset="UTF-8"'},
            )
        if path in ("/", "/index.html"):
            body, ctype = self._static["/static/index.html"]
            return Response(200, body, ctype, {"Cache-Control": "no-cache"})
        if path in self._static:
            body, ctype = self._static[path]
            return Response(200, body, ctype, {"Cache-Control": "no-cache"})
        try:
            if path == "/api/sources":
                return json_response(await self._view.sources())
            if path == "/api/stats":
                return json_response(await self._view.stats())
            if path == "/api/counts":
                return await self._counts(parse_qs(parts.query))
            if path.startswith("/api/thumb/") and path.endswith(".jpg"):
                return await self._thumbnail(unquote(path[len("/api/thumb/") : -len(".jpg")]))
        except ConfigError as exc:
            return json_response({"error": str(exc)}, 400)
        except LookoutError as exc:
            return json_response({"error": str(exc)}, 503)
        return text_response(404, "not found")

    async def _ready(self) -> Response:
        try:
            await self._view.ping()
        except LookoutError as exc:
            return text_response(503, str(exc))
        return text_response(200, "ok")

    async def _counts(self, query: dict[str, list[str]]) -> Response:
        source = query.get("source", [""])[0]
        window = query.get("window", [self._view.windows[0] if self._view.windows else ""])[0]
        if not source:
            return json_response({"error": "give ?source=<source id>"}, 400)
        try:
            limit = int(query.get("limit", [str(MAX_WINDOWS)])[0])
        except ValueError:
            return json_response({"error": "limit must be a whole number"}, 400)
        return json_response(await self._view.counts(source, window, min(max(limit, 1), MAX_WINDOWS)))

    async def _thumbnail(self, source: str) -> Response:
        data = await self._view.thumbnail(source)
        if data is None:
            return text_response(404, f"no recent frame of {source!r}")
        return Response(200, data, "image/jpeg", {"Cache-Control": "no-store"})

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                method, target, headers = await _read_request(reader)
            try:
                response = await self.respond(method, target, headers)
            except Exception:
                # One broken request must not take the dashboard down; the trace goes to the log.
                log.exception("dashboard request %s %s failed", method, target)
                response = text_response(500, "internal error; see the dashboard's log")
            await _write_response(writer, response, head_only=method == "HEAD")
        except _BadRequest as exc:
            await _write_response(writer, text_response(400, str(exc)), head_only=False)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


class _BadRequest(Exception):
    pass


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
    try:
        request_line = (await reader.readline()).decode("latin-1")
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise _BadRequest("malformed request line")
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADER_LINES):
            line = (await reader.readline()).decode("latin-1")
            if line in ("\r\n", "\n", ""):
                return parts[0], parts[1], headers
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest("malformed header line")
            headers[name.strip().lower()] = value.strip()
    except ValueError as exc:  # a line over the stream's limit
        raise _BadRequest("request line or header too long") from exc
    raise _BadRequest("too many header lines")


async def _write_response(writer: asyncio.StreamWriter, response: Response, *, head_only: bool) -> None:
    lines = [
        f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in {**SECURITY_HEADERS, **response.headers}.items()),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    if not head_only:
        writer.write(response.body)
    async with asyncio.timeout(REQUEST_TIMEOUT_S):
        await writer.drain()


def label_parents() -> dict[str, str | None]:
    """The packaged taxonomy's hierarchy (car -> vehicle, fox -> mammal -> animal)."""
    from stream_worker.taxonomy import Taxonomy

    return dict(Taxonomy.load().parents)


async def start_dashboard(
    settings: Settings, *, host: str = "127.0.0.1", port: int = 8080, token: str | None = None
) -> DashboardServer:
    """Start a dashboard for ``settings`` (Redis URL and key prefix, count windows).

    Returns the running server (``.url`` says where; ``await server.stop()`` ends it). This is
    what ``stream-worker dashboard`` runs, and what the demo calls to show its run live.
    """
    from stream_worker.redis_client import make_redis

    client = make_redis(settings.redis)
    view = LiveView(
        client,
        key_prefix=settings.redis.key_prefix,
        windows=settings.counts.windows,
        parents=await asyncio.to_thread(label_parents),
    )
    server = DashboardServer(view, token=token, on_stop=client.aclose)
    try:
        await server.start(host, port)
    except BaseException:
        await client.aclose()
        raise
    return server


async def run_dashboard(
    settings: Settings, stop: asyncio.Event, *, host: str, port: int, token: str | None
) -> int:
    """Serve the dashboard until ``stop`` is set; returns the exit code."""
    server = await start_dashboard(settings, host=host, port=port, token=token)
    login = "" if token is None else " (login: the token, as bearer or basic-auth password)"
    print(f"dashboard: {server.url}{login}", file=sys.stderr, flush=True)
    log.info(
        "dashboard reads Redis %s, key prefix %r",
        redact_url(settings.redis.redis_url),
        settings.redis.key_prefix,
    )
    try:
        await stop.wait()
    finally:
        await server.stop()
    return 0
