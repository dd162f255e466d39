"""Replicas beyond one host: the Ray Serve deployment on the CPU with the tiny preset.

Two replicas serve concurrent requests with the right images, through the app's service and
through the HTTP endpoint; a replica killed mid-request fails that request alone, with a message
that says to send it again, while the other request finishes and later ones are served.
"""

import base64
import io
import json
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray
from PIL import Image
from ray import serve

from pulid.limits import MAX_EXTRA_PHOTOS, MAX_UPLOAD_BYTES
from pulid.request import GenerationRequest, InvalidRequestError
from pulid.serve.ray_serve import (
    APP_NAME,
    MAX_BODY_BYTES,
    REPLICA_LOST,
    ROUTE,
    BodyTooLarge,
    PuLIDReplica,
    RayRunner,
    deploy,
    read_body,
    request_from_json,
)
from pulid.serve.service import GenerationService, ServiceError
from tiny_random.pipeline import tiny_pipeline_with_face_models

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "example_inputs" / "astronaut.png"
REPLICAS = 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    """A local Ray with the deployment's two replicas (tiny preset, on the CPU), and its handle."""
    # the preset's files exist before the replicas start (they would also write them safely)
    local = tiny_pipeline_with_face_models(Path(tempfile.gettempdir()) / "pulid-flux-tiny-random")
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    port = free_port()
    try:
        handle = deploy(
            ["--preset", "tiny-random"], REPLICAS, gpus_per_replica=0, cpus_per_replica=1, http_port=port
        )
        yield handle, port, local
    finally:
        serve.shutdown()
        ray.shutdown()


def photo() -> np.ndarray:
    return np.asarray(Image.open(PHOTO).convert("RGB"))


def request(seed: int, steps: int = 3, size: int = 256) -> GenerationRequest:
    return GenerationRequest(
        prompt="a portrait", id_images=[photo()], width=size, height=size, num_steps=steps, seed=seed
    )


def close_to(image, reference) -> bool:
    """The same image up to float32 sums in another order (a uint8 step in a few pixels)."""
    difference = np.abs(np.asarray(image, dtype=int) - np.asarray(reference, dtype=int))
    return difference.max() <= 1 and (difference > 0).mean() < 0.005


@pytest.mark.slow  # a Ray cluster on this machine
def test_two_replicas_serve_concurrent_requests_with_the_right_images(served, tmp_path):
    handle, _, local = served
    service = GenerationService(None, tmp_path, runner=RayRunner(handle, REPLICAS))
    seen: dict[int, list[float]] = {1: [], 2: []}
    jobs = {
        seed: service.start(
            request(seed, steps=12),
            session=f"s{seed}",
            progress=lambda e, s=seed: seen[s].append(time.time()),
        )
        for seed in (1, 2)
    }
    for job in jobs.values():
        assert job.wait(180)
    for seed, job in jobs.items():
        result = job.result()
        assert result.seed == seed
        assert close_to(Image.open(result.path).convert("RGB"), local.generate(request(seed, steps=12)).image)
    # they ran at once: each had events before the other's last one
    assert min(seen[1]) < max(seen[2]) and min(seen[2]) < max(seen[1])
    assert service.lora_names() == local.lora_library.names()  # asked of a replica
    assert service.lora_names(refresh=True) == local.lora_library.names()


@pytest.mark.slow  # a Ray cluster on this machine
def test_a_request_with_a_lora_is_admitted_from_the_event_loop(served, tmp_path):
    """The app's handler admits requests on gradio's event loop, where a blocking Serve call is
    refused: the LoRA list a request is checked against is the one fetched beforehand."""
    import asyncio
    import dataclasses

    from pulid.request import LoRAChoice

    handle, _, local = served
    service = GenerationService(None, tmp_path, runner=RayRunner(handle, REPLICAS), listed_loras_only=True)
    name = local.lora_library.names()[0]
    with_lora = dataclasses.replace(request(5), loras=(LoRAChoice(name, 0.5),))

    async def admit():
        return service.start(with_lora, session="s", progress=lambda _: None)

    job = asyncio.run(admit())
    assert job.wait(180)
    assert job.result().metadata["loras"][0]["name"] == Path(name).stem


@pytest.mark.slow  # a Ray cluster on this machine
def test_the_http_endpoint_answers_with_the_image_and_refuses_bad_requests(served):
    _, port, local = served
    url = f"http://127.0.0.1:{port}{ROUTE}"
    body = {
        "prompt": "a portrait",
        "id_images": [base64.b64encode(PHOTO.read_bytes()).decode()],
        "width": 256,
        "height": 256,
        "num_steps": 3,
        "seed": 7,
    }
    answer = httpx.post(url, json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    (image,) = answer.json()["images"]
    assert image["seed"] == 7 and image["metadata"]["num_steps"] == 3
    decoded = Image.open(io.BytesIO(base64.b64decode(image["png"]))).convert("RGB")
    assert close_to(decoded, local.generate(request(7)).image)
    rebound = httpx.post(url, json=body, headers={"Host": "attacker.example"}, timeout=60)
    assert rebound.status_code == 421 and "'attacker.example'" in rebound.json()["error"]  # DNS rebinding
    for bad, message in (
        ({**body, "num_steps": "many"}, "Number of steps must be a whole number"),
        ({**body, "colour": "red"}, "Unknown setting(s): colour"),
        ({**body, "id_images": ["not base64!"]}, "id_images[1]: it is not base64"),
        # the app's rules: LoRAs only from the list (no server paths, no downloads), the photo limit
        ({**body, "loras": [["/etc/passwd", 1.0]]}, "'/etc/passwd' is not one of this app's LoRAs"),
        ({**body, "loras": [["someone/repo/x.safetensors", 1.0]]}, "is not one of this app's LoRAs"),
        ({**body, "id_images": body["id_images"] * 6}, "5 extra photos were sent; at most 4"),
    ):
        refused = httpx.post(url, json=bad, timeout=60)
        assert refused.status_code == 400 and message in refused.json()["error"], refused.text
    garbled = httpx.post(url, content=b"{not json", timeout=60)
    assert garbled.status_code == 400 and "not JSON" in garbled.json()["error"]


class FakeBody:
    """What :func:`read_body` reads of a starlette request: headers and the body in chunks."""

    def __init__(self, chunks: list[bytes], declared: int | None = None):
        self.chunks = chunks
        self.headers = {} if declared is None else {"content-length": str(declared)}
        self.read = 0

    async def stream(self):
        for chunk in self.chunks:
            self.read += 1
            yield chunk


def test_a_body_over_the_limit_is_refused_before_it_is_all_read():
    import asyncio

    assert asyncio.run(read_body(FakeBody([b"ab", b"cd"]), limit=4)) == b"abcd"
    declared = FakeBody([b"x" * 10], declared=10)
    with pytest.raises(BodyTooLarge, match="larger than"):
        asyncio.run(read_body(declared, limit=4))
    assert declared.read == 0  # refused from its Content-Length
    streamed = FakeBody([b"x" * 3] * 100)  # chunked: no length given
    with pytest.raises(BodyTooLarge):
        asyncio.run(read_body(streamed, limit=4))
    assert streamed.read == 2  # stopped at the chunk that passed the limit
    # the limit fits the largest valid request: every photo at the upload limit, in base64
    assert MAX_BODY_BYTES > (MAX_EXTRA_PHOTOS + 1) * MAX_UPLOAD_BYTES * 4 / 3


@pytest.mark.slow  # a Ray cluster on this machine
def test_a_replica_killed_mid_request_fails_that_request_alone(served, tmp_path):
    handle, _, _ = served
    service = GenerationService(None, tmp_path, runner=RayRunner(handle, REPLICAS))
    stepping = {1: threading.Event(), 2: threading.Event()}

    def watch(seed):
        return lambda event: getattr(event, "step", -1) >= 1 and stepping[seed].set()

    jobs = {
        seed: service.start(request(seed, steps=50, size=512), session=f"k{seed}", progress=watch(seed))
        for seed in (1, 2)
    }
    assert stepping[1].wait(120) and stepping[2].wait(120)  # both are mid-request, on both replicas
    replicas = [
        actor for actor in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in actor["name"]
    ]
    assert len(replicas) == REPLICAS
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    outcomes = {}
    for seed, job in jobs.items():
        assert job.wait(180)
        try:
            outcomes[seed] = job.result().seed
        except ServiceError as err:
            outcomes[seed] = str(err)
    lost = [seed for seed, outcome in outcomes.items() if outcome == REPLICA_LOST]
    finished = [seed for seed, outcome in outcomes.items() if outcome == seed]
    assert len(lost) == 1 and len(finished) == 1, outcomes
    # Serve replaces the lost replica; later requests are served
    assert service.run(request(3)).seed == 3
    # Serve starts a new replica in place of the killed one. Its status reads RUNNING until the
    # controller notices the death, then UNHEALTHY until the new replica has built its pipeline:
    # wait for a replica set without the killed one, and RUNNING.
    killed = replicas[0]["name"]

    def replaced() -> bool:
        names = {
            a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]
        }
        return killed not in names and len(names) == REPLICAS

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if replaced() and serve.status().applications[APP_NAME].status == "RUNNING":
            break
        time.sleep(1)
    application = serve.status().applications[APP_NAME]
    assert replaced() and application.status == "RUNNING", (application.message, application.deployments)


def test_the_endpoint_counts_photos_before_decoding_any(monkeypatch):
    import pulid.images

    decoded = []
    real = pulid.images.load_image_bytes
    monkeypatch.setattr(pulid.images, "load_image_bytes", lambda *a: decoded.append(1) or real(*a))
    photo = base64.b64encode(PHOTO.read_bytes()).decode()
    with pytest.raises(InvalidRequestError, match="6 extra photos were sent"):
        request_from_json({"prompt": "a", "id_images": [photo] * 7})
    assert decoded == []  # each could be a 50 MP image: none is opened before the count
    assert request_from_json({"prompt": "a", "id_images": [photo] * 2}).id_images and len(decoded) == 2


class JSONRequest:
    """What the replica's handler reads of a starlette request: a host header and a JSON body."""

    def __init__(self, body: dict):
        self.headers = {"host": "localhost"}
        self.body = json.dumps(body).encode()

    async def stream(self):
        yield self.body


def replica_with(events) -> PuLIDReplica:
    """A replica whose generations are ``events(request)``, without Ray or a pipeline."""
    replica = object.__new__(PuLIDReplica)
    replica.hosts = ("*",)
    replica.events = events
    replica.lora_names = lambda: []
    return replica


def test_the_endpoint_answers_out_of_memory_as_busy_and_stops_for_a_client_that_left():
    import asyncio

    from pulid.serve.events import Failed
    from pulid.serve.service import OOM_MESSAGE

    body = JSONRequest({"prompt": "a portrait", "width": 256, "height": 256})
    answer = asyncio.run(replica_with(lambda request: iter([Failed(OOM_MESSAGE, busy=True)]))(body))
    assert answer.status_code == 503 and json.loads(answer.body)["error"] == OOM_MESSAGE

    closed = threading.Event()

    def endless(request):
        try:
            while True:
                time.sleep(0.01)
                yield "denoising"
        finally:
            closed.set()  # the generation's stream is closed: it stops at its next step

    async def leave_early():
        handler = asyncio.ensure_future(replica_with(endless)(body))
        await asyncio.sleep(0.3)
        handler.cancel()  # what Serve does when the HTTP client disconnects
        with pytest.raises(asyncio.CancelledError):
            await handler

    asyncio.run(leave_early())
    assert closed.wait(5)
