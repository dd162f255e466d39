"""Host names and visitors: the DNS-rebinding check and who a request counts against."""

import httpx
import pytest

from pulid.serve import gradio_app, handlers
from pulid.serve.web_guard import BodyLimit, allowed_hosts, host_allowed, host_name, visitor


@pytest.mark.parametrize(
    "header, name",
    [
        ("LocalHost:8080", "localhost"),
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]:7860", "::1"),
        ("::1", "::1"),
        ("owner-space.hf.space", "owner-space.hf.space"),
        ("", ""),
    ],
)
def test_host_names_are_read_without_port_or_brackets(header, name):
    assert host_name(header) == name


def test_which_names_are_answered_by_default_and_on_request():
    local = allowed_hosts("127.0.0.1", share=False, in_space=False, given=None)
    assert host_allowed("localhost:8080", local) and host_allowed("[::1]:8080", local)
    assert not host_allowed("attacker.example:8080", local)
    assert not host_allowed("", local)  # HTTP/1.0 without a Host header: refused when bound locally
    shared = allowed_hosts("127.0.0.1", share=True, in_space=False, given=None)
    assert host_allowed("abc123.gradio.live", shared) and not host_allowed("gradio.live.example", shared)
    assert allowed_hosts("0.0.0.0", share=False, in_space=False, given=None) == ("*",)
    assert allowed_hosts("127.0.0.1", share=False, in_space=True, given=None) == ("*",)
    mine = allowed_hosts("0.0.0.0", share=False, in_space=False, given="studio.lan, *.example.org")
    assert host_allowed("studio.lan:8080", mine) and host_allowed("a.example.org", mine)
    assert host_allowed("localhost", mine) and not host_allowed("example.org.evil", mine)


def test_a_forged_host_is_refused_before_gradio_and_the_real_one_served(server):
    port = httpx.URL(server).port
    forged = httpx.get(server, headers={"Host": f"rebound.attacker.example:{port}"}, timeout=10)
    assert forged.status_code == 421 and "--allowed_hosts rebound.attacker.example" in forged.text
    api = httpx.post(
        f"{server}gradio_api/call/generate", json={"data": []}, headers={"Host": "evil"}, timeout=10
    )
    assert api.status_code == 421
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        assert httpx.get(server, headers={"Host": host}, timeout=10).status_code == 200


def test_a_request_with_two_host_headers_is_refused_whichever_comes_first(server):
    """The check and gradio must read the same name: with two, neither can be sure which."""
    import socket

    port = httpx.URL(server).port
    for first, second in (("evil.example", "localhost"), ("localhost", "evil.example")):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            head = f"GET /config HTTP/1.1\r\nHost: {first}\r\nHost: {second}\r\nConnection: close\r\n\r\n"
            connection.sendall(head.encode())
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
        status = answer.split(b"\r\n", 1)[0]
        assert b" 400 " in status and b"send one Host header" in answer and b"evil.example" not in answer


class FakeRequest:
    def __init__(self, host, forwarded=None, session="s1"):
        self.client = type("Client", (), {"host": host})()
        self.headers = {"x-forwarded-for": forwarded} if forwarded else {}
        self.session_hash = session


def test_visitors_are_counted_by_address_and_only_the_proxys_entry_is_trusted():
    assert visitor("203.0.113.5", None, False, "s") == "address 203.0.113.5"
    # Behind a proxy the last entry is the one the proxy added; a client's own entries come first.
    assert visitor("10.0.0.2", "1.2.3.4, 198.51.100.7", True, "s") == "address 198.51.100.7"
    assert visitor("10.0.0.2", "1.2.3.4", False, "s") == "address 10.0.0.2"  # not behind a proxy
    # This machine's own address (the local user, the --share tunnel): counted by session.
    assert visitor("127.0.0.1", None, False, "s9") == "session s9"
    assert visitor("::1", None, False, "s9") == "session s9"
    assert visitor("testclient", None, False, "s9") == "session s9"
    a, b = FakeRequest("203.0.113.5", session="one"), FakeRequest("203.0.113.5", session="two")
    assert handlers.visitor_of(a, False) == handlers.visitor_of(b, False)  # new session, same visitor
    behind = FakeRequest("10.0.0.2", forwarded="203.0.113.9", session="three")
    assert handlers.visitor_of(behind, True) == "address 203.0.113.9"


def test_a_body_over_its_route_limit_is_refused_before_it_is_read(server):
    from pulid.limits import MAX_JSON_BODY_BYTES

    big = {"data": ["x" * (MAX_JSON_BODY_BYTES + 1)]}  # e.g. a 1 GB prompt, or 100,000 file entries
    refused = httpx.post(f"{server}gradio_api/call/generate", json=big, timeout=30)
    assert refused.status_code == 413 and f"at most {MAX_JSON_BODY_BYTES:,}" in refused.text
    assert httpx.get(server, timeout=10).status_code == 200  # and the server goes on
    limits = gradio_app.BODY_LIMITS
    guard = BodyLimit(None, MAX_JSON_BODY_BYTES, limits)
    assert guard.limit_for("/gradio_api/upload") == limits["/gradio_api/upload"]
    assert guard.limit_for("/gradio_api/component_server/") == MAX_JSON_BODY_BYTES  # no pieces of drawings
    assert guard.limit_for("/gradio_api/queue/join") == MAX_JSON_BODY_BYTES
    assert guard.limit_for("/gradio_api/call/upload") == MAX_JSON_BODY_BYTES  # a route, not an ending


def test_a_body_without_a_length_is_cut_off_where_it_passes_the_limit():
    import asyncio

    chunks = [{"type": "http.request", "body": b"x" * 4, "more_body": True} for _ in range(100)]
    seen: list[str] = []

    async def app(scope, receive, send):  # reads like a route does, until the body ends or the client leaves
        while True:
            message = await receive()
            seen.append(message["type"])
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                return

    async def receive():
        return chunks.pop(0)

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": "/gradio_api/queue/join", "headers": []}
    asyncio.run(BodyLimit(app, 10, {})(scope, receive, send))
    assert seen == ["http.request", "http.request", "http.disconnect"]  # 4, 8, then 12 > 10 bytes
    assert len(chunks) == 97  # nothing more was read
    assert sent[0]["status"] == 413 and b"over 10 bytes" in sent[1]["body"]  # as a declared length gets

    async def parsing_app(scope, receive, send):  # a route that fails on the cut body, then answers
        await receive()
        from starlette.requests import ClientDisconnect

        raise ClientDisconnect()

    chunks[:] = [{"type": "http.request", "body": b"x" * 20, "more_body": True}]
    sent.clear()
    asyncio.run(BodyLimit(parsing_app, 10, {})(scope, receive, send))  # no traceback escapes
    assert [m.get("status") for m in sent[:1]] == [413]


def test_a_client_that_leaves_mid_body_is_not_a_server_error(caplog):
    import asyncio
    import logging

    from starlette.requests import ClientDisconnect

    async def upload_route(scope, receive, send):
        await receive()
        raise ClientDisconnect()

    async def receive():
        return {"type": "http.request", "body": b"--xx\r\n", "more_body": True}

    async def send(message):
        raise AssertionError("nobody is left to answer")

    scope = {"type": "http", "path": "/gradio_api/upload", "headers": []}
    with caplog.at_level(logging.INFO, logger="pulid.serve.web_guard"):
        asyncio.run(BodyLimit(upload_route, 10**6, {})(scope, receive, send))
    assert "ended before its body did" in caplog.text

    async def broken_route(scope, receive, send):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):  # any other error is the server's and goes on up
        asyncio.run(BodyLimit(broken_route, 10**6, {})(scope, receive, send))


def test_uploads_stop_at_a_visitors_hourly_share_and_short_of_a_full_disk(tmp_path, monkeypatch):
    import asyncio
    import shutil
    from collections import namedtuple

    from pulid.serve.web_guard import UploadQuota

    async def upload_route(scope, receive, send):  # stores what it reads, or refuses a bad upload
        body = b""
        while (message := await receive())["type"] == "http.request":
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 400 if body.startswith(b"bad") else 200})
        await send({"type": "http.response.body", "body": b""})

    def post(guard, client, size, path="/gradio_api/upload", declared=True, first=b"x"):
        sent = []
        chunks = [{"type": "http.request", "body": first + b"x" * (size - 1), "more_body": False}]

        async def receive():
            return chunks.pop(0) if chunks else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        headers = [(b"content-length", b"%d" % size)] if declared else []
        scope = {"type": "http", "path": path, "client": (client, 1), "headers": headers}
        asyncio.run(guard(scope, receive, send))
        return sent[0]["status"]

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**12, 0, 10**11))
    guard = UploadQuota(upload_route, tmp_path / "not-yet", min_free=10**9, per_visitor=100, largest=50)
    assert [post(guard, "203.0.113.9", 40) for _ in range(3)] == [200, 200, 429]  # 80, then 120 > 100
    assert post(guard, "198.51.100.7", 40) == 200  # another visitor has their own share
    assert post(guard, "127.0.0.1", 10**6) == 200  # this machine: the disk check only
    assert post(guard, "203.0.113.9", 10, path="/gradio_api/queue/join") == 200  # other routes pass
    guard.window_s = 0.0  # an hour later
    assert post(guard, "203.0.113.9", 40) == 200
    # what is counted is what was stored: small uploads without a length, and no refused ones
    fresh = UploadQuota(upload_route, tmp_path, min_free=10**9, per_visitor=100, largest=10**6)
    assert [post(fresh, "192.0.2.1", 10, declared=False) for _ in range(10)] == [200] * 10  # 100 bytes
    assert post(fresh, "192.0.2.1", 10, declared=False) == 429
    other = UploadQuota(upload_route, tmp_path, min_free=10**9, per_visitor=100, largest=10**6)
    assert [post(other, "192.0.2.2", 60, first=b"bad") for _ in range(3)] == [400] * 3  # none stored
    assert post(other, "192.0.2.2", 60) == 200
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**12, 0, 10**9 + 30))
    assert post(guard, "127.0.0.1", 40) == 507  # it would leave under the reserve


def test_without_behind_proxy_no_local_peer_names_the_client(monkeypatch):
    """uvicorn takes X-Forwarded-For from a peer on this machine as the client's address by
    default, so any local client (or --share's tunnel) could pick the address it is counted by."""
    import argparse

    seen = {}

    class Demo:
        local_url, share_url = "http://127.0.0.1:1/", None

        def launch(self, **options):
            import os

            seen["trusted"] = os.environ.get("FORWARDED_ALLOW_IPS")

    args = argparse.Namespace(host="127.0.0.1", port=1, share=False, allowed_hosts=None)
    for behind_proxy, trusted in ((False, ""), (True, None)):
        monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
        gradio_app.launch(
            Demo(), argparse.Namespace(**vars(args), behind_proxy=behind_proxy), prevent_thread_lock=True
        )
        assert seen["trusted"] == trusted
