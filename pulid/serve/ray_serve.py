"""Replicas beyond one machine: the pipeline as a Ray Serve deployment, one replica per GPU.

    pip install -r requirements-serve.txt                # ray[serve]: an optional extra
    python app_flux.py --ray --replicas 2                 # a local Ray; --ray_address auto joins a cluster
    python app_flux.py --ray --replicas 2 --preset tiny-random   # on the CPU, to try it

Each replica (:class:`PuLIDReplica`) loads the whole pipeline on the GPU Ray gives it (its
``cuda``) from the same model flags as the app. In front of them:

- an HTTP endpoint, ``POST /generate`` on ``--ray_http_port`` (default 8000): a JSON object with
  ``prompt``, ``id_images`` (base64 JPEG/PNG files) and any declared setting by name; the answer is
  ``{"images": [{"seed", "face_similarity", "metadata", "png"}]}`` (``png`` in base64), or
  ``{"error": message}`` with status 400 for a request that cannot be served as sent (the app's
  checks and limits, :mod:`pulid.limits`; ``loras`` only by the names the app lists), 413 for a body
  larger than a valid request can be, 503 when the GPU ran out of memory or (from Serve)
  :data:`~pulid.limits.MAX_QUEUED` requests already wait; a client that disconnects stops its
  generation at the next step;
- the gradio app on ``--port``, whose service sends each job to a replica (:class:`RayRunner`):
  steps and stages stream back, cancel reaches the replica, and the line runs as many jobs at
  once as there are replicas.

Ray Serve routes each request to a replica with room (``max_ongoing_requests`` is 1: a GPU
generates one request at a time). A replica that dies mid-request fails that request only, with
a message that says to send it again; Serve starts a new replica, and the others go on.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from flux.errors import UserError
from flux.sampling import GenerationCancelled, StepInfo
from pulid import stages
from pulid.limits import MAX_EXTRA_PHOTOS, MAX_JSON_BODY_BYTES, MAX_QUEUED, MAX_UPLOAD_BYTES
from pulid.pipeline import GeneratedImage
from pulid.request import GenerationRequest, InvalidRequestError, check_person_photo_count
from pulid.serve.events import Event, consume, generation_events
from pulid.serve.service import Runner, ServiceError, check_listed_loras, lora_names_of
from pulid.similarity import rounded

logger = logging.getLogger(__name__)

APP_NAME = "pulid"
ROUTE = "/generate"
# the largest body a valid request can be: its photos in base64 (4/3 of their bytes), and the JSON
# of its settings
MAX_BODY_BYTES = (MAX_EXTRA_PHOTOS + 1) * MAX_UPLOAD_BYTES * 4 // 3 + MAX_JSON_BODY_BYTES
LORA_LIST_WAIT_S = 10.0
REPLICA_LOST = (
    "The GPU worker running this request stopped before it finished (it was lost or restarted); "
    "the other workers go on: send the request again."
)


class PuLIDReplica:
    """One pipeline on one GPU, built from the app's model flags (``argv``)."""

    def __init__(self, argv: Sequence[str], hosts: Sequence[str] = ("*",)):
        """``hosts``: the host names the HTTP endpoint answers to (:mod:`pulid.serve.web_guard`)."""
        from pulid.serve.startup import add_model_arguments, build_pipeline

        self.hosts = tuple(hosts)

        parser = argparse.ArgumentParser(prog="pulid-replica")
        add_model_arguments(parser)
        args, _ = parser.parse_known_args(list(argv))  # the app's own flags are the front end's
        self.pipeline = build_pipeline(args)

    def events(self, request: GenerationRequest) -> Iterator[Event]:
        """The request as a stream of events (:mod:`pulid.serve.events`), for :class:`RayRunner`."""
        yield from generation_events(self.pipeline, request)

    def lora_names(self) -> list[str]:
        """The LoRAs requests may name: the replica's LoRA folder and its usable speed LoRAs."""
        return lora_names_of(self.pipeline)

    async def __call__(self, http_request) -> object:
        """``POST /generate``: JSON in, JSON out (see the module's docstring)."""
        import asyncio

        from starlette.responses import JSONResponse

        from pulid.serve.web_guard import host_allowed, host_name

        header = http_request.headers.get("host", "")
        if "*" not in self.hosts and not host_allowed(header, self.hosts):  # DNS rebinding
            name = host_name(header)[:100]
            return JSONResponse({"error": f"This endpoint does not answer to the host name {name!r}."}, 421)
        try:
            body = json.loads(await read_body(http_request, MAX_BODY_BYTES))
        except BodyTooLarge as err:
            return JSONResponse({"error": str(err)}, status_code=413)
        except ValueError:
            return JSONResponse({"error": "The body is not JSON: send a JSON object."}, status_code=400)
        try:
            request = request_from_json(body)
            check_listed_loras(request, self.lora_names())  # no server paths, no arbitrary downloads
        except InvalidRequestError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        images: list[GeneratedImage] = []
        gone = threading.Event()

        def report(_) -> None:
            if gone.is_set():
                raise GenerationCancelled

        try:
            await asyncio.to_thread(lambda: consume(self.events(request), report, images.append))
        except asyncio.CancelledError:  # Serve cancels the handler when its client disconnects
            gone.set()  # and the generation stops at its next step, freeing the GPU
            raise
        except GenerationCancelled:
            return JSONResponse({"error": "cancelled"}, status_code=499)
        except InvalidRequestError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        except ServiceError as err:  # out of GPU memory: the request may succeed later
            return JSONResponse({"error": str(err)}, status_code=503)
        return JSONResponse({"images": [image_json(image) for image in images]})


class BodyTooLarge(UserError):
    """An HTTP body over :data:`MAX_BODY_BYTES` (answered with 413 before it is all read)."""


async def read_body(http_request, limit: int) -> bytes:
    """The body, read as it arrives and refused as soon as it passes ``limit`` bytes (also when its
    Content-Length says so), so one client cannot make a replica hold an arbitrary upload."""
    too_large = BodyTooLarge(
        f"The request is larger than {limit // 10**6} MB: send at most {MAX_EXTRA_PHOTOS + 1} photos "
        f"of at most {MAX_UPLOAD_BYTES // 10**6} MB each."
    )
    declared = http_request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in http_request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def request_from_json(body: object) -> GenerationRequest:
    """A request from the HTTP API's JSON: photos decoded and checked as uploads, settings coerced."""
    from pulid.images import ImageError, load_image_bytes

    if not isinstance(body, dict):
        raise InvalidRequestError("Send a JSON object with a prompt, id_images and settings.")
    values = dict(body)
    encoded = values.pop("id_images", [])
    if not isinstance(encoded, list) or not all(isinstance(item, str) for item in encoded):
        raise InvalidRequestError("id_images must be a list of base64-encoded JPEG or PNG files.")
    check_person_photo_count(1, len(encoded))  # before decoding: each photo may be 50 MP
    photos = []
    for number, text in enumerate(encoded, start=1):
        try:
            photos.append(load_image_bytes(base64.b64decode(text, validate=True), f"id_images[{number}]"))
        except (ImageError, ValueError) as err:
            message = str(err) if isinstance(err, ImageError) else "it is not base64"
            raise InvalidRequestError(f"id_images[{number}]: {message}") from None
    return GenerationRequest.from_values(id_images=photos, **values)


def image_json(image: GeneratedImage) -> dict:
    """One image for the HTTP API: PNG bytes in base64, with its seed and settings."""
    buffer = io.BytesIO()
    image.image.save(buffer, format="PNG")
    return {
        "seed": image.seed,
        "face_similarity": rounded(image.face_similarity),
        "metadata": image.metadata,
        "png": base64.b64encode(buffer.getvalue()).decode("ascii"),
    }


def _stream(response) -> Iterator[Event]:
    """A streaming Serve response as a plain generator: closing it cancels the request on the
    replica, and a replica lost mid-request is :data:`REPLICA_LOST` for the user."""
    from ray.exceptions import RayActorError

    try:
        yield from response
    except GeneratorExit:
        response.cancel()
        raise
    except RayActorError:
        logger.warning("a replica stopped during a request", exc_info=True)
        raise ServiceError(REPLICA_LOST) from None


class RayRunner(Runner):
    """The service's runner (:class:`pulid.serve.service.Runner`) in front of a Serve deployment."""

    def __init__(self, handle, capacity: int):
        self.handle = handle
        self.capacity = capacity
        self._lora_names: list[str] = []
        self.lora_names(refresh=True)

    def generate(
        self,
        request: GenerationRequest,
        report: Callable[[StepInfo | str], None],
        on_image: Callable[[GeneratedImage], None],
    ) -> list[np.ndarray]:
        report(stages.WAITING_FOR_WORKER)
        response = self.handle.options(stream=True).events.remote(request)
        return consume(_stream(response), report, on_image)

    def lora_names(self, refresh: bool = False) -> list[str]:
        """The replicas' LoRA list, as last fetched: a request's admission must not wait for a
        replica, which runs one request at a time. ``refresh`` asks a replica again (a blocking
        call: never from the event loop); one that stays busy longer than
        :data:`LORA_LIST_WAIT_S` leaves the list as it was."""
        if refresh:
            try:
                self._lora_names = self.handle.lora_names.remote().result(timeout_s=LORA_LIST_WAIT_S)
            except TimeoutError:
                logger.warning("no replica was free to list its LoRAs; the list is as it was")
        return list(self._lora_names)


def deploy(
    model_argv: Sequence[str],
    replicas: int,
    *,
    gpus_per_replica: float = 1.0,
    cpus_per_replica: float = 1.0,
    http_host: str = "127.0.0.1",
    http_port: int = 8000,
    hosts: Sequence[str] | None = None,
):
    """Start Serve's HTTP proxy and ``replicas`` replicas of :class:`PuLIDReplica`; returns the
    handle. Ray must be initialised (``ray.init``). ``hosts``: the host names the endpoint answers
    to (default: the app's rule for ``http_host``, :func:`pulid.serve.web_guard.allowed_hosts`)."""
    from ray import serve

    from pulid.serve.web_guard import allowed_hosts

    hosts = tuple(hosts) if hosts is not None else allowed_hosts(http_host, False, False, None)

    serve.start(http_options={"host": http_host, "port": http_port})
    deployment = serve.deployment(
        PuLIDReplica,
        name="PuLIDReplica",
        num_replicas=replicas,
        max_ongoing_requests=1,
        max_queued_requests=MAX_QUEUED,  # beyond it Serve answers 503 at once (the app's line bound)
        ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica},
    )
    return serve.run(deployment.bind(list(model_argv), hosts), name=APP_NAME, route_prefix=ROUTE)


def start(
    model_argv: Sequence[str],
    replicas: int,
    *,
    on_gpus: bool = True,
    address: str | None = None,
    http_host: str = "127.0.0.1",
    http_port: int = 8000,
    hosts: Sequence[str] | None = None,
):
    """Join Ray (a local one, or the cluster at ``address``) and :func:`deploy` the replicas, each
    on a GPU of its own (``on_gpus``; the tiny preset runs on the CPU); returns the handle."""
    import ray

    ray.init(address=address)
    handle = deploy(
        model_argv,
        replicas,
        gpus_per_replica=1 if on_gpus else 0,
        http_host=http_host,
        http_port=http_port,
        hosts=hosts,
    )
    logger.info("%d replicas; HTTP endpoint: http://%s:%d%s", replicas, http_host, http_port, ROUTE)
    return handle
