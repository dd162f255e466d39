"""A generation as a stream of picklable events, for runners whose GPU work is in another process.

A ZeroGPU worker (:mod:`pulid.serve.zerogpu`) and a Ray Serve replica (:mod:`pulid.serve.ray_serve`) cannot
call the service's callbacks: they send what happens instead. :func:`generation_events` runs a
request and yields its steps (without their latents, which stay behind), stage names, finished
images (latents on the CPU), then :class:`Finished`; an expected failure becomes :class:`Failed`
with its message for the user, since other errors cross processes as little more than their class
name. Closing the stream (a cancel) stops the generation at its next step or decoder block.
:func:`consume` is the other end, in the app's process.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from flux.errors import UserError
from flux.sampling import GenerationCancelled, StepInfo
from pulid.pipeline import GeneratedImage, PuLIDFluxPipeline
from pulid.request import GenerationRequest, InvalidRequestError

JOIN_SECONDS = 30.0  # how long a cancelled generation may take to reach its next step or block
_turns: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pipeline -> its lock
_turns_guard = threading.Lock()


def _turn_of(pipeline: PuLIDFluxPipeline) -> threading.Lock:
    """The lock one generation of ``pipeline`` holds: a cancelled one that takes longer than
    :data:`JOIN_SECONDS` to stop (a stage that does not report, such as a download) finishes
    before the next request on that pipeline starts, so two never share its LoRAs and hooks."""
    with _turns_guard:
        return _turns.setdefault(pipeline, threading.Lock())


@dataclass(frozen=True)
class Finished:
    """The last event of a generation: the face crops the ``--dev`` view shows."""

    debug_images: list[np.ndarray]


@dataclass(frozen=True)
class Failed:
    """An expected failure (no face, a bad request, out of GPU memory), with its message.
    ``busy``: the request was fine and the GPU could not take it now (out of memory)."""

    message: str
    busy: bool = False


Event = StepInfo | str | GeneratedImage | Finished | Failed


def generation_events(pipeline: PuLIDFluxPipeline, request: GenerationRequest) -> Iterator[Event]:
    """``request`` on ``pipeline`` as events (see the module's docstring). The generation runs in
    a thread of its own so that its callbacks become yields; closing the stream sets its cancel
    flag and waits for it to stop."""
    from pulid.serve.service import OOM_MESSAGE, GenerationService

    events: queue.Queue = queue.Queue()
    cancel = threading.Event()
    done = object()

    def report(event) -> None:
        if cancel.is_set():
            raise GenerationCancelled
        events.put(event)

    def work() -> None:
        try:
            with _turn_of(pipeline):  # a cancelled generation still finishing holds it
                result = pipeline.generate(
                    request,
                    callback=lambda info: report(replace(info, latents=None)),
                    on_stage=report,
                    on_image=lambda image: report(replace(image, latents=image.latents.cpu())),
                )
            events.put(Finished(result.debug_images))
        except GenerationCancelled:
            pass
        except UserError as err:
            events.put(Failed(str(err)))
        except torch.OutOfMemoryError:
            GenerationService.release_memory()
            events.put(Failed(OOM_MESSAGE, busy=True))
        except BaseException as err:  # noqa: BLE001 - a bug: raised again in this generator
            events.put(err)
        finally:
            events.put(done)

    thread = threading.Thread(target=work, name="generation-events", daemon=True)
    thread.start()
    try:
        while (event := events.get()) is not done:
            if isinstance(event, BaseException):
                raise event
            yield event
    finally:
        cancel.set()
        thread.join(JOIN_SECONDS)


def consume(
    events: Iterable[Event],
    report: Callable[[StepInfo | str], None],
    on_image: Callable[[GeneratedImage], None],
) -> list[np.ndarray]:
    """The app's end of a stream: steps and stages to ``report`` (which may raise
    :class:`~flux.sampling.GenerationCancelled`: the stream is then closed), images to
    ``on_image``; returns the face crops. A :class:`Failed` event becomes
    :class:`~pulid.request.InvalidRequestError` with its message (a busy one, out of memory:
    :class:`~pulid.serve.service.ServiceError`)."""
    iterator = iter(events)
    try:
        for event in iterator:
            if isinstance(event, GeneratedImage):
                on_image(event)
            elif isinstance(event, Finished):
                return event.debug_images
            elif isinstance(event, Failed):
                if event.busy:
                    from pulid.serve.service import ServiceError

                    raise ServiceError(event.message)
                raise InvalidRequestError(event.message)
            else:
                report(event)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    raise RuntimeError("the generation's events ended without its images")
