"""Sessions: a visitor's Cancel stops that visitor's job and nobody else's (two concurrent HTTP clients)."""

import contextlib
import json
import threading
import time

import pytest

from pulid.serve import gradio_app, handlers, page
from scripts.soak import free_port
from tests.app_requests import PHOTO, Reply, settings
from tiny_random.pipeline import tiny_face_analyzer, tiny_pipeline

STEPS = 40
STEP_SECONDS = 0.05


@pytest.fixture(scope="module")
def slow_service(tmp_path_factory, models_dir):
    """The service over a tiny pipeline whose DiT takes STEP_SECONDS per pass, and the passes."""
    pipeline = tiny_pipeline(tmp_path_factory.mktemp("tiny"), tiny_face_analyzer(models_dir))
    passes = []

    def slow_step(module, args):  # test instrumentation: the real model, made slow enough to race
        passes.append(time.perf_counter())
        time.sleep(STEP_SECONDS)

    pipeline.dit.register_forward_pre_hook(slow_step)
    return gradio_app.make_service(pipeline, tmp_path_factory.mktemp("outputs")), passes


@pytest.fixture(scope="module")
def slow_server(slow_service):
    """The app over :func:`slow_service`: its address, and the DiT's passes."""
    service, passes = slow_service
    args = gradio_app.parse_args(["--preset", "tiny-random"])
    demo = page.create_demo(args, service)
    port = free_port()
    gradio_app.launch(demo, args, server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", passes
    demo.close()


def submit(client, **kw):
    from gradio_client import handle_file

    values = settings(**{"num_steps": STEPS, **kw})
    values["id_image"] = handle_file(str(PHOTO))
    return client.submit(**values, api_name="/generate")


def wait_until_running(passes, before: int, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while len(passes) < before + 3:  # a few denoising steps done: the job is surely under way
        assert time.time() < deadline, "the job never started"
        time.sleep(0.02)


def test_another_clients_cancel_does_not_stop_my_job(slow_server):
    from gradio_client import Client

    url, passes = slow_server
    alice, bob = Client(url, verbose=False), Client(url, verbose=False)
    assert alice.session_hash != bob.session_hash
    before = len(passes)
    job = submit(alice, seed="11")
    wait_until_running(passes, before)
    said = bob.predict(api_name="/cancel")  # Bob cancels: his own (idle) session only
    assert said.startswith("Nothing to cancel")
    reply = Reply(job.result(timeout=120))
    assert reply.seed == 11 and reply.image
    assert len(passes) - before == STEPS  # Alice's job ran every step


def test_my_cancel_stops_my_job_and_the_work_stops(slow_server):
    from gradio_client import Client

    url, passes = slow_server
    alice = Client(url, verbose=False)
    before = len(passes)
    job = submit(alice, seed="12")
    wait_until_running(passes, before)
    assert alice.predict(api_name="/cancel").startswith("**Cancelled.**")
    with pytest.raises(Exception):  # noqa: B017 - cancelled: no image comes back, whatever gradio reports
        job.result(timeout=120)
    time.sleep(10 * STEP_SECONDS)
    ran = len(passes) - before
    assert ran < STEPS // 2, f"{ran} of {STEPS} steps ran after the cancel"
    # and the server serves the next request
    again = Client(url, verbose=False)
    assert Reply(submit(again, seed="13", num_steps=2).result(timeout=120)).seed == 13


def test_cancelled_jobs_stop_computing_and_the_next_request_starts_at_once(slow_server):
    """Job.cancel() of gradio_client (the /cancel route with the event id) ends the work itself,
    not only the client's wait: with three long jobs cancelled, a short one runs right away."""
    from gradio_client import Client

    url, passes = slow_server
    clients = [Client(url, verbose=False) for _ in range(3)]
    before = len(passes)
    jobs = [submit(c, seed=str(20 + i)) for i, c in enumerate(clients)]
    wait_until_running(passes, before)
    for job in jobs:
        job.cancel()
    start = time.perf_counter()
    assert Reply(submit(Client(url, verbose=False), seed="30", num_steps=2).result(timeout=120)).seed == 30
    waited = time.perf_counter() - start
    ran = len(passes) - before
    # Three jobs of 40 steps would take 6 s of passes; the short job waited for at most a few steps.
    assert ran < STEPS and waited < 12 * STEP_SECONDS * 2 + 3, (ran, waited)


def test_a_client_that_leaves_stops_its_job(slow_server):
    import httpx

    from tests.app_requests import settings as defaults

    url, passes = slow_server
    before = len(passes)
    values = {**defaults(), "num_steps": STEPS, "seed": "40"}
    posted = httpx.post(f"{url}gradio_api/call/generate", json={"data": list(values.values())}, timeout=30)
    event_id = posted.json()["event_id"]
    with httpx.stream("GET", f"{url}gradio_api/call/generate/{event_id}", timeout=60) as stream:
        for _ in stream.iter_lines():
            if len(passes) >= before + 3:
                break  # the job is running: hang up
    time.sleep(20 * STEP_SECONDS)
    ran = len(passes) - before
    time.sleep(10 * STEP_SECONDS)
    assert len(passes) - before == ran < STEPS, "the job went on after its client left"


def test_one_visitor_cannot_fill_the_line(slow_server):
    """A client (one session from this machine) gets three places, running job included; the
    fourth request is refused at once with a message, and other visitors are still served."""
    from gradio_client import Client

    from pulid.limits import MAX_QUEUED_PER_VISITOR

    url, passes = slow_server
    greedy = Client(url, verbose=False)
    jobs = [submit(greedy, seed=str(50 + i)) for i in range(MAX_QUEUED_PER_VISITOR)]
    wait_until_running(passes, len(passes))
    extra = submit(greedy, seed="59")
    with pytest.raises(Exception, match="already have 3 requests"):
        extra.result(timeout=60)
    for job in jobs:
        job.cancel()
    assert Reply(submit(Client(url, verbose=False), seed="60", num_steps=2).result(timeout=120)).seed == 60


def test_a_waiting_job_is_sent_its_status_only_when_it_changes(slow_server):
    """Each waiting job's handler sent a keep-alive every 0.5 s: with 1 running and 32 waiting, the
    server took 6.7-20 s to answer /info and 10.8 s to cancel. Now a job whose place in line stays
    the same hears its status line once, then every KEEPALIVE_SECONDS (counted over 3 s here)."""
    import threading

    import httpx
    from gradio_client import Client

    from tests.app_requests import settings as defaults

    assert handlers.KEEPALIVE_SECONDS > 3
    url, passes = slow_server
    before = len(passes)
    running = submit(Client(url, verbose=False), seed="60", num_steps=50, num_images=2)  # 5 s of passes
    wait_until_running(passes, before)
    config = httpx.get(f"{url}config", timeout=30).json()
    index = {d.get("api_name"): d["id"] for d in config["dependencies"]}
    values = {**defaults(), "num_steps": 2, "seed": "61"}
    body = {"data": list(values.values()), "fn_index": index["generate"], "session_hash": "waiting-bob"}
    assert httpx.post(f"{url}gradio_api/queue/join", json=body, timeout=30).status_code == 200
    messages: list[str] = []

    def listen(response):
        with contextlib.suppress(httpx.StreamError, httpx.HTTPError):  # closed at the end of the count
            for line in response.iter_lines():
                if line.startswith("data:"):
                    messages.append(json.loads(line[5:])["msg"])

    with httpx.stream("GET", f"{url}gradio_api/queue/data?session_hash=waiting-bob", timeout=30) as stream:
        threading.Thread(target=listen, args=(stream,), daemon=True).start()
        time.sleep(3.0)
        heard = list(messages)
    generating = heard.count("process_generating")
    assert 1 <= generating <= 2, heard  # "checking the request", then "1 ahead": nothing more while it waits
    httpx.post(
        f"{url}gradio_api/run/cancel",
        json={"data": [], "fn_index": index["cancel"], "session_hash": "waiting-bob"},
        timeout=30,
    )
    running.cancel()


@pytest.mark.parametrize(
    "slow_point",
    [
        pytest.param("service._check_loras", id="the service's check (a LoRA waiting on a slow hub)"),
        pytest.param("handlers.uploaded_image", id="the page's check of its files (a slow disk)"),
    ],
)
def test_a_cancel_while_the_request_is_checked_stops_it(slow_service, slow_server, monkeypatch, slow_point):
    """Cancel pressed while the request's files were being checked stopped gradio's handler, but
    the job it was putting in line ran anyway; and the page said there was nothing to cancel. The
    page checks its own files before the service sees the request: a Cancel then reaches it too."""
    from gradio_client import Client

    from pulid.serve import handlers

    service, passes = slow_service
    url, _ = slow_server
    where, name = slow_point.split(".")
    owner = {"service": service, "handlers": handlers}[where]
    checked, entered = getattr(owner, name), threading.Event()

    def slow_check(*args, **kwargs):  # test instrumentation: the check made slow enough to cancel in
        entered.set()
        time.sleep(1.5)
        return checked(*args, **kwargs)

    monkeypatch.setattr(owner, name, slow_check)
    alice = Client(url, verbose=False)
    before = len(passes)
    job = submit(alice, seed="70", num_steps=10)
    assert entered.wait(60), f"the request never reached {slow_point}"
    assert alice.predict(api_name="/cancel").startswith("**Cancelled.**")
    time.sleep(1.5 + 20 * STEP_SECONDS)
    assert len(passes) == before, "the cancelled request ran"
    assert service.waiting() == 0
    job.cancel()
