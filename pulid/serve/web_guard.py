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
import time
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


UPLOAD_ROUTE = "/gradio_api/upload"


class UploadQuota:
    """ASGI middleware for gradio's upload route: uploads are kept for an hour, so without a bound
    one client could fill the disk at network speed. An upload is refused (507) when it would leave
    less than ``min_free`` bytes free in ``folder``, and (429) when the visitor has already stored
    ``per_visitor`` bytes in the last ``window_s`` seconds. The bytes counted are those received
    by uploads that were stored (a refused or aborted one counts nothing). Visitors are counted by
    network address (:func:`visitor`); requests from this machine (the local user, or
    ``--share``'s tunnel) share the disk check only."""

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
        if scope["type"] != "http" or not scope.get("path", "").rstrip("/").endswith(UPLOAD_ROUTE):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        size = int(declared) if declared.isdigit() else self.largest  # the disk check's worst case
        who = self.visitor(scope, headers)
        if refusal := self.refusal(who, size if declared.isdigit() else 0, size):
            status, message = refusal
            return await _answer(send, status, message.encode())
        received, stored = 0, False

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def watched(message):
            nonlocal stored
            if message["type"] == "http.response.start":
                stored = message.get("status", 500) < 400
            await send(message)

        try:
            await self.app(scope, counted, watched)
        finally:
            if stored and who is not None:
                self._sent.setdefault(who, []).append((time.monotonic(), received))

    def visitor(self, scope, headers) -> str | None:
        """The network address uploads count against; None for this machine's requests."""
        client = (scope.get("client") or (None,))[0]
        forwarded = headers.get(b"x-forwarded-for", b"").decode("latin-1") or None
        who = visitor(client, forwarded, self.behind_proxy, "")
        return who if who.startswith("address ") else None

    def refusal(self, who: str | None, size: int, worst: int) -> tuple[int, str] | None:
        """(status, message) when ``who`` cannot upload ``size`` more bytes now (``worst``: what
        the disk must hold at most); else None."""
        import shutil
        from pathlib import Path

        place = Path(self.folder)
        while not place.exists() and place != place.parent:  # made on the first upload
            place = place.parent
        try:
            free = shutil.disk_usage(place).free
        except OSError:
            free = None
        if free is not None and free - worst < self.min_free:
            logger.warning("an upload was refused: %s bytes free in %s", f"{free:,}", self.folder)
            return 507, "The server's disk is nearly full, so it takes no uploads now: try again later.\n"
        if who is None:
            return None
        now = time.monotonic()
        for key in list(self._sent):  # counts older than the window go, and visitors with none
            self._sent[key] = [(at, n) for at, n in self._sent[key] if now - at < self.window_s]
            if not self._sent[key]:
                del self._sent[key]
        used = sum(n for _, n in self._sent.get(who, []))
        if used >= self.per_visitor or used + size > self.per_visitor:
            return 429, (
                f"You have uploaded {self.per_visitor // 10**9} GB in the last hour, this server's "
                "share for one visitor: try again later.\n"
            )
        return None


MAX_FILE_REFERENCES = 64  # file references one request may hold (the app's inputs take about 30)
MAX_JSON_ITEMS = 100_000  # values in one request's JSON (a 1 MB body holds fewer in any real use)
MAX_PATH_CHARS = 1024  # an upload's path is some 100 characters


class PayloadCheck:
    """ASGI middleware for the JSON bodies of gradio's routes (events by ``/queue/join``,
    ``/call/<api>``, ``/call/v2/<api>``, ``/run/<api>``, ...): what gradio would only refuse inside
    its queue, where the client gets an empty error (``{"error": null}``) and the reason goes to
    the log, or would act on before the app's own checks, is answered at once with 422 in gradio's
    validation shape, which gradio_client raises as a ``ValidationError`` naming the input:

    * a file reference (gradio's ``FileData``, at any depth, on any route) whose ``path`` is not
      a regular file inside ``upload_folder``: a server path, a folder (which gradio would add to
      the files its cleaner deletes, and on which that cleaner stops for good), a URL (which
      gradio would download), or not a path at all;
    * fewer values than the event has inputs (where the request names the event);
    * JSON nested too deeply to parse, or holding more values or file references than any request.

    ``events(route) -> (input names) | None``: the inputs of an event by ``fn_index`` or API name;
    None for one this check does not know (gradio answers it). The check runs in a worker thread:
    it reads the file system, and no visitor's page may wait on it."""

    def __init__(self, app, events, upload_folder):
        self.app = app
        self.events = events
        self.upload_folder = upload_folder

    async def __call__(self, scope, receive, send):
        import asyncio

        headers = dict(scope.get("headers") or [])
        form = headers.get(b"content-type", b"").startswith(b"multipart/")  # uploads, drawings
        if scope["type"] != "http" or scope.get("method") != "POST" or form:
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        problem = await asyncio.to_thread(self.problem, body, scope.get("path", ""))
        if problem is not None:
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

    def problem(self, body: bytes, path: str) -> tuple[str, str] | None:
        """(input name, message) for a body to refuse at the door; else None."""
        import json

        if not body.strip().startswith((b"{", b"[")):
            return None  # not JSON: gradio's own 422 names it
        try:
            payload = json.loads(body)
        except RecursionError:
            return "body", "The JSON is nested too deeply: send the values flat, as the API lists them."
        except ValueError:
            return None
        if not isinstance(payload, dict):
            return None
        parts = path.rstrip("/").split("/")
        v2 = parts[-3:-1] == ["call", "v2"]  # values by name
        named = len(parts) >= 2 and parts[-2] in ("call", "run", "api") and not v2
        data = payload if v2 else payload.get("data")
        names = None
        if isinstance(data, list):
            names = self.events(parts[-1] if named else _event_number(payload.get("fn_index")))
        if v2:
            inputs: list[tuple[object, object]] = list(payload.items())
        else:  # the values by position, then the rest of the body under one name
            inputs = list(enumerate(data)) if isinstance(data, list) else []
            inputs.append(
                (
                    "request",
                    {k: v for k, v in payload.items() if not (k == "data" and isinstance(data, list))},
                )
            )
        found = _file_references([value for _, value in inputs])
        if found is None:
            return "data", (
                f"The request holds more than {MAX_JSON_ITEMS:,} values or {MAX_FILE_REFERENCES} files: "
                "send one request for each image."
            )
        for index, reference in found:
            if (why := _not_an_upload(reference, self.upload_folder)) is not None:
                return _input_name(inputs[index][0], names), why
        if names is not None and len(data) < len(names):
            return "data", (
                f"{len(names)} values are expected ({', '.join(names)}), {len(data)} were sent: send one "
                "for each input, None for those you leave out."
            )
        return None


def _input_name(key: object, names: list[str] | None) -> str:
    """How a message names an input: its API name, else its place."""
    if isinstance(key, str):
        return key
    if names is not None and isinstance(key, int) and key < len(names):
        return names[key]
    return f"input {key + 1}" if isinstance(key, int) else "request"


def _event_number(fn_index) -> object:
    """``fn_index`` as gradio reads it (its model takes "1", " 1", true and 1.0 for 1)."""
    if isinstance(fn_index, bool):
        return int(fn_index)
    if isinstance(fn_index, float) and fn_index.is_integer():
        return int(fn_index)
    if isinstance(fn_index, str) and fn_index.strip().lstrip("+-").isdigit():
        return int(fn_index.strip())
    return fn_index


def _file_references(values: list) -> list[tuple[int, dict]] | None:
    """(top-level index, reference) of every gradio ``FileData`` in ``values`` at any depth; None
    when there are more values or references than any request holds."""
    found, seen = [], 0
    stack = [(index, value) for index, value in enumerate(values)]
    while stack:
        index, item = stack.pop()
        seen += 1
        if seen > MAX_JSON_ITEMS or len(found) > MAX_FILE_REFERENCES:
            return None
        if isinstance(item, list):
            stack.extend((index, value) for value in item)
        elif isinstance(item, dict):
            meta = item.get("meta")
            if isinstance(meta, dict) and meta.get("_type") == "gradio.FileData":
                found.append((index, item))
            stack.extend((index, value) for value in item.values())
    return sorted(found, key=lambda pair: pair[0])


def _not_an_upload(reference: dict, upload_folder) -> str | None:
    """Why a file reference is not an uploaded file (a message naming what was sent), or None."""
    import os
    from pathlib import Path

    path = reference.get("path")
    if path is None and reference.get("url") is not None:
        return None  # a link: the app's inputs refuse it by name ("upload the photo itself")
    if not isinstance(path, str) or not path or len(path) > MAX_PATH_CHARS or "\x00" in path:
        return "a file reference must name an uploaded file: upload the file itself first."
    shown = path if len(path) <= 60 else path[:57] + "..."
    if "://" in path:
        return f"{shown!r} is a link: upload the file itself first (links are not fetched)."
    root = Path(upload_folder).resolve()
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError, ValueError):
        resolved = None
    if resolved is None or root not in resolved.parents:
        return f"{shown!r} was not uploaded to this app: upload the file itself first."
    if not os.path.isfile(resolved):  # a folder, a FIFO: never handed on (see the class)
        return f"{shown!r} is not a regular file: upload a JPEG, PNG or WebP photo."
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
