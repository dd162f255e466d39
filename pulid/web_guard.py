"""Who is asking, under which host name, and with how much: the web app's questions before any work.

* **Host names.** A page on another site can make a browser send requests to a server on the
  visitor's own machine by pointing its own name at 127.0.0.1 (DNS rebinding); the only sign is a
  ``Host`` header naming the foreign site. :class:`HostCheck` answers such requests with 421 and a
  message before gradio sees them. An app bound to the loopback interface answers only to local
  names (plus ``*.gradio.live`` with ``--share``); one bound to all interfaces or running in a
  Space answers to any name unless ``--allowed_hosts`` says otherwise, because nothing else can
  know the names it is reached by.
* **Visitors.** The per-visitor share of the line (:mod:`pulid.limits`) is counted by network
  address, not by gradio's session, which a client chooses itself. Behind a proxy (a Hugging Face
  Space, ``--behind_proxy``) the address is the last ``X-Forwarded-For`` entry: the one the proxy
  itself added, which the client cannot forge. Requests from this machine (the local user, or
  visitors through the ``--share`` tunnel, which all arrive from 127.0.0.1) are told apart by
  session instead.
* **Body size.** :class:`BodyLimit` refuses a request body larger than its route can need
  (:mod:`pulid.limits`), before it is read.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
from collections.abc import Iterable, Mapping

logger = logging.getLogger(__name__)

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
ANY_INTERFACE = ("0.0.0.0", "::", "")


def allowed_hosts(bind: str, share: bool, in_space: bool, given: str | None) -> tuple[str, ...]:
    """The host names the app answers to (patterns: ``*`` any, ``*.example.org`` subdomains)."""
    if given:
        names = [name.strip().lower() for name in given.split(",") if name.strip()]
        return tuple(dict.fromkeys([*names, *LOCAL_NAMES]))
    if in_space or bind in ANY_INTERFACE:
        return ("*",)
    names = [*LOCAL_NAMES, bind.lower()]
    if share:
        names.append("*.gradio.live")
    return tuple(dict.fromkeys(names))


def host_name(header: str) -> str:
    """The name in a ``Host`` header, without port or IPv6 brackets, lower case."""
    header = header.strip().lower()
    if header.startswith("["):  # [::1]:8080
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def host_allowed(header: str, patterns: Iterable[str]) -> bool:
    """Whether the name in a ``Host`` header matches one of ``patterns`` (an empty one never does)."""
    name = host_name(header)
    return bool(name) and any(pattern == "*" or fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


class HostCheck:
    """ASGI middleware: requests whose ``Host`` is not an allowed name get 421 and go no further."""

    def __init__(self, app, patterns: Iterable[str]):
        self.app = app
        self.patterns = tuple(patterns)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or "*" in self.patterns:
            return await self.app(scope, receive, send)
        hosts = [value for name, value in scope.get("headers") or [] if name == b"host"]
        header = hosts[0].decode("latin-1") if hosts else ""
        if len(hosts) == 1 and host_allowed(header, self.patterns):  # two: which one is meant?
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        if len(hosts) > 1:
            return await _answer(send, 400, b"A request names one host: send one Host header.\n")
        body = (
            f"This app does not answer to the host name {host_name(header)[:100]!r}. "
            "If you reach it under that name on purpose, start it with --allowed_hosts "
            f"{host_name(header)[:100] or 'NAME'}.\n"
        ).encode()
        await _answer(send, 421, body)


class BodyLimit:
    """ASGI middleware: a request body larger than its route can need is refused, so no client can
    make the server read and hold an arbitrary amount (gradio bounds each uploaded file, but not a
    JSON body, nor how many files one upload holds).

    ``by_route``: path endings (``/upload``) with their own limit; ``default`` for the rest. A
    declared ``Content-Length`` over the limit gets 413 before anything is read; a body without one
    is cut off where it passes the limit (the route sees the client leave)."""

    def __init__(self, app, default: int, by_route: Mapping[str, int]):
        self.app = app
        self.default = default
        self.by_route = dict(by_route)

    def limit_for(self, path: str) -> int:
        """The body limit of ``path``: its route's, else the default."""
        path = path.rstrip("/")
        return next((limit for end, limit in self.by_route.items() if path.endswith(end)), self.default)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope.get("path", ""))
        declared = dict(scope.get("headers") or []).get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > limit:
            message = f"The request is {int(declared):,} bytes; this route takes at most {limit:,}.\n"
            return await _answer(send, 413, message.encode())
        received, cut, answered = 0, False, False

        async def limited():
            nonlocal received, cut
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    cut = True
                    return {"type": "http.disconnect"}
            return message

        async def answer(message):
            nonlocal answered
            if cut:
                return  # the route's own answer to a body it never got whole: 413 is sent instead
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, answer)
        except Exception as err:
            if not (cut or _client_left(err)):
                raise
            # a client that left mid-body (an aborted upload) is not a server error: no traceback
            logger.info("a request to %s ended before its body did", scope.get("path", "")[:100])
        if cut and not answered:
            await _answer(
                send, 413, f"The request is over {limit:,} bytes: this route takes at most that.\n".encode()
            )


class UploadQuota:
    """ASGI middleware for the upload route: uploads are kept for an hour, so without a bound one
    client could fill the disk at network speed. An upload is refused (507) when it would leave
    less than ``min_free`` bytes free in ``folder``, and (429) when it would take one visitor past
    ``per_visitor`` bytes in the last ``window_s`` seconds. Visitors are counted by network address
    (:func:`visitor`); requests from this machine (the local user, or ``--share``'s tunnel) share
    the disk check only. A body without a length counts as the route's limit."""

    def __init__(
        self,
        app,
        folder,
        min_free: int,
        per_visitor: int,
        largest: int,
        behind_proxy: bool = False,
        window_s: float = 3600.0,
    ):
        self.app = app
        self.folder = folder
        self.min_free = min_free
        self.per_visitor = per_visitor
        self.largest = largest
        self.behind_proxy = behind_proxy
        self.window_s = window_s
        self._sent: dict[str, list[tuple[float, int]]] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("path", "").rstrip("/").endswith("/upload"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        size = int(declared) if declared.isdigit() else self.largest
        if refusal := self.refusal(scope, headers, size):
            status, message = refusal
            return await _answer(send, status, message.encode())
        return await self.app(scope, receive, send)

    def refusal(self, scope, headers, size: int) -> tuple[int, str] | None:
        """(status, message) when an upload of ``size`` bytes cannot be taken now; else None, and
        it is counted."""
        import shutil
        import time
        from pathlib import Path

        place = Path(self.folder)
        while not place.exists() and place != place.parent:  # made on the first upload
            place = place.parent
        try:
            free = shutil.disk_usage(place).free
        except OSError:
            free = None
        if free is not None and free - size < self.min_free:
            logger.warning("an upload was refused: %s bytes free in %s", f"{free:,}", self.folder)
            return 507, "The server's disk is nearly full, so it takes no uploads now: try again later.\n"
        client = (scope.get("client") or (None,))[0]
        forwarded = headers.get(b"x-forwarded-for", b"").decode("latin-1") or None
        who = visitor(client, forwarded, self.behind_proxy, "")
        if not who.startswith("address "):
            return None
        now = time.monotonic()
        recent = [(at, n) for at, n in self._sent.get(who, []) if now - at < self.window_s]
        if sum(n for _, n in recent) + size > self.per_visitor:
            self._sent[who] = recent
            return 429, (
                f"You have uploaded {self.per_visitor // 10**9} GB in the last hour, this server's "
                "share for one visitor: try again later.\n"
            )
        self._sent[who] = [*recent, (now, size)]
        for other in [
            key for key, sent in self._sent.items() if all(now - at >= self.window_s for at, _ in sent)
        ]:
            del self._sent[other]  # visitors gone for an hour: their counts go too
        return None


class PayloadCheck:
    """ASGI middleware for gradio's event routes (``/queue/join``, ``POST /call/<api_name>``): a
    payload that gradio would only refuse inside its queue, where the client gets an empty error
    (``{"error": null}``) and the reason goes to the log, is answered at once with 422 and gradio's
    own validation shape, which gradio_client raises as a ``ValidationError`` naming the input:

    * fewer values than the event has inputs;
    * a file whose ``path`` is not inside ``upload_folder`` (a server path, never uploaded).

    ``events(route) -> (input names) | None``: the inputs of the event a request names
    (``fn_index`` for the queue, the API name for ``/call``); None for one this check does not
    know (gradio answers it)."""

    def __init__(self, app, events, upload_folder):
        self.app = app
        self.events = events
        self.upload_folder = upload_folder

    async def __call__(self, scope, receive, send):
        parts = scope.get("path", "").rstrip("/").split("/")
        is_call = len(parts) >= 2 and parts[-2] == "call"  # POST /call/<api_name>
        is_join = parts[-2:] == ["queue", "join"]
        if scope["type"] != "http" or scope.get("method") != "POST" or not (is_call or is_join):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if problem := self.problem(body, parts[-1] if is_call else None):
            name, message = problem
            detail = [{"__type__": "validate", "is_valid": False, "parameter_name": name, "message": message}]
            logger.info("refused a request: %s: %s", name, message[:200])
            return await _answer_json(send, 422, {"detail": detail})
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def problem(self, body: bytes, api_name: str | None) -> tuple[str, str] | None:
        """(input name, message) for a payload gradio would fail on in its queue; else None."""
        import json

        try:
            payload = json.loads(body)
        except ValueError:
            return None  # gradio's own 422 names a body that is not JSON
        if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
            return None
        names = self.events(api_name if api_name is not None else payload.get("fn_index"))
        if names is None:
            return None
        data = payload["data"]
        if len(data) < len(names):
            return "data", (
                f"{len(names)} values are expected ({', '.join(names)}), {len(data)} were sent: send one "
                "for each input, None for those you leave out."
            )
        for name, value in zip(names, data[: len(names)], strict=True):  # gradio ignores the extra
            if (path := _foreign_path(value, self.upload_folder)) is not None:
                shown = path if len(path) <= 60 else path[:57] + "..."
                return name, f"{shown!r} was not uploaded to this app: upload the file itself first."
        return None


def _foreign_path(value, upload_folder) -> str | None:
    """The first file reference in ``value`` (gradio's ``FileData``, at any depth) whose path is
    not inside ``upload_folder``; None if there is none."""
    from pathlib import Path

    root = Path(upload_folder).resolve()
    stack, seen = [value], 0
    while stack and seen < 10_000:  # a payload is at most 1 MB (BodyLimit): this is a bound, not a limit
        item = stack.pop()
        seen += 1
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            meta = item.get("meta")
            path = item.get("path")
            if isinstance(meta, dict) and meta.get("_type") == "gradio.FileData" and isinstance(path, str):
                resolved = Path(path).resolve()
                if resolved != root and root not in resolved.parents:
                    return path
            stack.extend(item.values())
    return None


async def _answer_json(send, status: int, value) -> None:
    """A JSON answer, sent before the app sees the request."""
    import json

    body = json.dumps(value).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _client_left(err: Exception) -> bool:
    """Whether ``err`` is starlette's "the client went away before its body ended"."""
    return type(err).__name__ == "ClientDisconnect"


async def _answer(send, status: int, body: bytes) -> None:
    """A plain-text answer, sent before the app sees the request."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def visitor(client_host: str | None, forwarded_for: str | None, behind_proxy: bool, session: str) -> str:
    """Who a request comes from: the proxy's last ``X-Forwarded-For`` entry behind a proxy, else
    the peer address; the session when that address is this machine's own or unknown."""
    address = client_host
    if behind_proxy and forwarded_for:
        address = forwarded_for.split(",")[-1].strip() or client_host
    try:
        if address and not ipaddress.ip_address(address).is_loopback:
            return f"address {address}"
    except ValueError:  # not an IP address (a test client's name, a unix socket)
        pass
    return f"session {session}"
