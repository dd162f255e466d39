"""The front doors' one way into the pipeline: a whole request in, saved images or a clear message out.

It takes a whole :class:`~pulid.request.GenerationRequest` (its settings and its images: pixels,
or files that it checks came from the upload folders and reads at the job's turn), gives it its
place in line, runs it with progress and cancellation, writes each image with its settings, and
turns every expected failure (bad input, no face, cancelled, out of GPU memory) into a
:class:`ServiceError` whose message a user can act on.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import gc
import itertools
import logging
import os
import queue
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from flux.errors import UserError
from flux.sampling import GenerationCancelled, StepInfo
from pulid import stages
from pulid.images import ImageError
from pulid.outputs import prune_outputs, save_new_image
from pulid.pipeline import FirstImage, GeneratedImage, PuLIDFluxPipeline
from pulid.request import GenerationRequest, InvalidRequestError
from pulid.serve.uploads import check_upload
from pulid.settings import shown

logger = logging.getLogger(__name__)

OOM_MESSAGE = (
    "The GPU ran out of memory. Try a smaller width and height, a shorter T5 length, true CFG scale 1, "
    "or start the app with --offload."
)
FAILED_MESSAGE = (
    "The generation failed on the server (the details are in its log). Try again; if it fails "
    "again, report it with the log."
)


CANCELLED = "Generation cancelled."
POLL_SECONDS = 0.25  # how often a job waiting for its turn looks at its cancel flag


class ServiceError(UserError):
    """An expected failure with a message for the user."""


class ServiceBusy(ServiceError):
    """The line for the GPU is full, or this visitor already has their share of it in it."""


class Cancelled(ServiceError):
    """The job was cancelled; ``images`` holds those of its images that were already saved."""

    def __init__(self, images: list[SavedImage]):
        super().__init__(CANCELLED)
        self.images = images


@dataclass(eq=False)
class _Ticket:
    """A place in the line for the pipeline."""

    client: str | None
    cancel: threading.Event = field(default_factory=threading.Event)


class _Line:
    """First come, first served turns on the pipelines (``running`` jobs at once, one per replica),
    with a cap on the line's length and on each visitor's places in it (running jobs included), so
    one client cannot fill it."""

    def __init__(self, max_waiting: int | None, max_per_client: int | None, running: int = 1):
        self.max_waiting = max_waiting
        self.max_per_client = max_per_client
        self.running = running
        self._tickets: deque[_Ticket] = deque()  # the head is the running job
        self._changed = threading.Condition()

    def join(self, client: str | None, cancel: threading.Event) -> _Ticket:
        with self._changed:
            if client is not None and self.max_per_client is not None:
                mine = sum(ticket.client == client for ticket in self._tickets)
                if mine >= self.max_per_client:
                    raise ServiceBusy(
                        f"You already have {mine} requests running or waiting, the most one visitor "
                        "may have: wait for one to finish, or cancel it, before sending another."
                    )
            waiting = max(len(self._tickets) - self.running, 0)
            if self.max_waiting is not None and waiting >= self.max_waiting:
                raise ServiceBusy(
                    f"The server is busy ({waiting} requests are waiting). Try again in a few minutes."
                )
            ticket = _Ticket(client, cancel)
            self._tickets.append(ticket)
            return ticket

    def wait_turn(self, ticket: _Ticket, report: Callable[[str], None]) -> None:
        """Return when ``ticket`` is among the first ``running``; ``report`` hears the place while it
        waits and may raise (a cancel) to leave the line."""
        told = None
        while True:
            with self._changed:
                ahead = self._ahead(ticket)
                if ahead and ahead == told:  # nothing new to tell: wait for a change or a poll
                    self._changed.wait(POLL_SECONDS)
                    ahead = self._ahead(ticket)
            if ahead == 0:
                return
            if ahead != told or ticket.cancel.is_set():
                report(stages.waiting_in_line(ahead))  # raises if cancelled
                told = ahead

    def _ahead(self, ticket: _Ticket) -> int:
        """Jobs that must finish before ``ticket`` runs (0: it may run now); hold the lock."""
        return max(self._tickets.index(ticket) - self.running + 1, 0)

    def leave(self, ticket: _Ticket) -> None:
        with self._changed:
            self._tickets.remove(ticket)
            self._changed.notify_all()

    def __len__(self) -> int:
        return len(self._tickets)


class Runner(Protocol):
    """Where a request's GPU work runs: in this process (:class:`LocalRunner`), on one of several
    pipelines (:class:`ReplicaRunner`), in a ZeroGPU worker (:class:`pulid.serve.zerogpu.ZeroGPURunner`),
    or on a Ray Serve replica (:class:`pulid.serve.ray_serve.RayRunner`). ``capacity``, when a runner
    has it, is how many jobs it runs at once (default 1)."""

    def admit(self, request: GenerationRequest) -> None:
        """Raise :class:`~pulid.request.InvalidRequestError` for a request this runner cannot take
        (runners that subclass this protocol take every request the request's own checks pass)."""
        return None

    def generate(
        self,
        request: GenerationRequest,
        report: Callable[[StepInfo | str], None],
        on_image: Callable[[GeneratedImage], None],
    ) -> list[np.ndarray]:
        """Generate, handing each finished image to ``on_image``; returns the ``--dev`` face crops.
        ``report`` gets each step and stage name and may raise
        :class:`~flux.sampling.GenerationCancelled` to stop."""


class ReplicaRunner(Runner):
    """One pipeline per GPU of this host (``--replicas N``): each generation runs on a free one,
    so the service runs N jobs at once (:attr:`capacity`)."""

    def __init__(self, pipelines: Sequence[PuLIDFluxPipeline]):
        if not pipelines:
            raise ValueError("a replica runner needs at least one pipeline")
        self.pipelines = list(pipelines)
        self.capacity = len(self.pipelines)
        self._free: queue.SimpleQueue[PuLIDFluxPipeline] = queue.SimpleQueue()
        for pipeline in self.pipelines:
            self._free.put(pipeline)

    def generate(
        self,
        request: GenerationRequest,
        report: Callable[[StepInfo | str], None],
        on_image: Callable[[GeneratedImage], None],
    ) -> list[np.ndarray]:
        pipeline = self._free.get()  # the line lets at most `capacity` jobs in: one is free
        try:
            return LocalRunner(pipeline).generate(request, report, on_image)
        finally:
            self._free.put(pipeline)


class Job:
    """One generation running in a worker thread (see :meth:`GenerationService.start`)."""

    def __init__(self, cancelled: threading.Event | None = None) -> None:
        self.cancelled = cancelled if cancelled is not None else threading.Event()
        self._done = threading.Event()
        self._result: ServiceResult | None = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._callbacks_lock = threading.Lock()

    def _work(self, run: Callable[[], ServiceResult]) -> None:
        try:
            self._result = run()
        except BaseException as err:  # noqa: BLE001 - handed to the waiting caller
            self._error = err
        finally:
            with self._callbacks_lock:
                self._done.set()
                callbacks, self._callbacks = self._callbacks, []
            for callback in callbacks:
                callback()

    def when_done(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the job has finished (from its worker thread; at once if it has),
        so that a waiter sees the end when it comes rather than at its next look."""
        with self._callbacks_lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the job has finished (waiting at most ``timeout`` seconds)."""
        return self._done.wait(timeout)

    def result(self) -> ServiceResult:
        """The finished job's result, or its error raised again."""
        if not self._done.is_set():
            raise RuntimeError("the job is still running")
        if self._error is not None:
            raise self._error
        return self._result

    def cancel(self) -> None:
        """Stop the job at its next step or decoder block (nothing happens if it has finished)."""
        self.cancelled.set()


@dataclass
class SavedImage:
    """One finished image: its file, seed, settings and face similarity (None: no face or no photo)."""

    path: Path
    seed: int
    metadata: dict
    face_similarity: float | None


@dataclass
class ServiceResult(FirstImage):
    """A request's saved images, in seed order, and the face images the ``--dev`` view shows."""

    images: list[SavedImage]
    debug_images: list[np.ndarray]

    @property
    def path(self) -> Path:
        """The first image's file."""
        return self.images[0].path


Progress = Callable[[StepInfo | str | SavedImage], None]  # steps, stage names, and each saved image


class LocalRunner(Runner):
    """Runs generations on a pipeline of this process."""

    def __init__(self, pipeline: PuLIDFluxPipeline):
        self.pipeline = pipeline

    def generate(
        self,
        request: GenerationRequest,
        report: Callable[[StepInfo | str], None],
        on_image: Callable[[GeneratedImage], None],
    ) -> list[np.ndarray]:
        result = self.pipeline.generate(request, callback=report, on_stage=report, on_image=on_image)
        return result.debug_images


def lora_names_of(pipeline: PuLIDFluxPipeline | None) -> list[str]:
    """The LoRAs ``pipeline`` can load by name (none without a LoRA library)."""
    library = getattr(pipeline, "lora_library", None)
    return [] if library is None else library.names()


def check_listed_loras(request: GenerationRequest, listed: Sequence[str]) -> None:
    """A public front door's rule for LoRAs: only those the server lists (no server paths, no
    arbitrary downloads), else :class:`InvalidRequestError` naming the first one that is not."""
    allowed = set(listed)
    for choice in request.loras:
        if choice.source not in allowed:
            raise InvalidRequestError(
                f"LoRA {shown(choice.source, 80)} is not one of this app's LoRAs: pick one from the list."
            )


def trim_host_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise, after a large photo)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):  # not glibc (e.g. musl): nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class GenerationService:
    """Holds one pipeline, gives requests their turns on it in order, and keeps per-session cancel flags.

    ``max_waiting`` and ``max_per_client`` bound the line (the app sets them from
    :mod:`pulid.limits`; ``None``, the default for local use, is no bound).
    """

    def __init__(
        self,
        pipeline: PuLIDFluxPipeline | None,
        output_dir: str | os.PathLike | None = None,
        upload_roots: Sequence[str | os.PathLike] | None = None,
        max_waiting: int | None = None,
        max_per_client: int | None = None,
        keep_outputs: int = 0,
        listed_loras_only: bool = False,
        runner: Runner | None = None,
    ):
        """``upload_roots``: the only folders file inputs may come from (the app passes gradio's
        upload cache); ``None`` accepts any regular file (local use). ``keep_outputs``: how many
        images the output folder keeps, the newest (0: all). ``listed_loras_only``: requests may
        name only the LoRAs :meth:`lora_names` lists (the app's rule: no server paths, no
        arbitrary downloads). ``runner``: where the GPU work runs (default: :class:`LocalRunner` on
        ``pipeline``); with a runner whose pipelines are elsewhere (Ray Serve), ``pipeline`` is
        None."""
        self.listed_loras_only = listed_loras_only
        self.pipeline = pipeline
        self.runner = runner if runner is not None else LocalRunner(pipeline)
        self.keep_outputs = keep_outputs
        self.upload_roots = None if upload_roots is None else [Path(root) for root in upload_roots]
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="pulid-flux-outputs-"))
        self._saving = threading.Lock()  # saving and pruning the output folder
        self._line = _Line(max_waiting, max_per_client, running=getattr(self.runner, "capacity", 1))
        self._counter = itertools.count(1)  # numbers this service's images in its output folder
        self._active: dict[str, set[threading.Event]] = {}  # session -> cancel flags of its jobs
        self._active_lock = threading.Lock()

    def cancel(self, session: str) -> int:
        """Stop every job of ``session`` at its next step or block, or in the line; other sessions'
        jobs go on. Returns how many jobs were running or waiting."""
        with self._active_lock:
            flags = self._active.get(session, ())
            for flag in flags:
                flag.set()
            return len(flags)

    @contextlib.contextmanager
    def admitting(self, session: str) -> Iterator[threading.Event]:
        """The cancel flag of a request a front door is still building: the session's Cancel
        reaches it from here on (a front door that checks files before :meth:`start` opens this
        first, then hands the flag to :meth:`start`). The flag is forgotten if the block fails."""
        cancel = threading.Event()
        with self._active_lock:
            self._active.setdefault(session, set()).add(cancel)
        try:
            yield cancel
        except BaseException:
            self._forget(session, cancel)
            raise

    def start(
        self,
        request: GenerationRequest,
        session: str = "default",
        progress: Progress | None = None,
        client: str | None = None,
        cancel: threading.Event | None = None,
    ) -> Job:
        """:meth:`run` in a worker thread: the caller can wait with a timeout and cancel the job.

        Everything that can be refused at once is refused here, before the thread starts: bad
        settings, image files that were not uploaded or are too large (checked from their headers),
        a full line (:class:`ServiceBusy`). The files are read only when the job's turn comes.
        The thread runs in a copy of the caller's context (gradio's progress lives in context
        variables). ``cancel``: the flag from :meth:`admitting`, when the request was built in it.
        """
        job = Job(cancel)
        admitted = self._admit(request, session, client, job.cancelled)
        context = contextvars.copy_context()
        thread = threading.Thread(
            target=context.run,
            args=(job._work, lambda: self._run_admitted(*admitted, session, progress)),
            name=f"generation-{session[:8]}",
            daemon=True,
        )
        thread.start()
        return job

    def run(
        self,
        request: GenerationRequest,
        session: str = "default",
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        client: str | None = None,
    ) -> ServiceResult:
        """Generate and save the request's images; ``progress`` gets each step (:class:`StepInfo`),
        the name of each stage and each :class:`SavedImage` as soon as it is written. ``cancel``
        (or :meth:`cancel` of the session) stops it at the next step or decoder block, also while
        it waits for its turn; the :class:`Cancelled` error holds the images already saved. The
        request's image files are read when its turn comes."""
        cancel = cancel if cancel is not None else threading.Event()
        admitted = self._admit(request, session, client, cancel)
        return self._run_admitted(*admitted, session, progress)

    def lora_names(self, refresh: bool = False) -> list[str]:
        """The LoRAs a request may name in the app: files in the LoRA folder and the usable speed
        LoRAs (:meth:`pulid.loras.LoRALibrary.names`). Where the pipelines are elsewhere, the
        list their runner last fetched; ``refresh`` fetches it again (it may wait for a worker)."""
        if hasattr(self.runner, "lora_names"):
            return self.runner.lora_names(refresh)
        return lora_names_of(self.pipeline)

    def _check_loras(self, request: GenerationRequest) -> None:
        if not (self.listed_loras_only and request.loras):
            return
        try:
            check_listed_loras(request, self.lora_names())
        except InvalidRequestError as err:
            raise ServiceError(str(err)) from None

    def waiting(self) -> int:
        """Requests in the line, the running one included."""
        return len(self._line)

    def _admit(
        self,
        request: GenerationRequest,
        session: str,
        client: str | None,
        cancel: threading.Event,
    ) -> tuple[GenerationRequest, _Ticket]:
        """The checks that need no turn, then a place in the line. The session's cancel reaches the
        request from the start: one pressed while its files are checked stops it too."""
        with self._active_lock:
            self._active.setdefault(session, set()).add(cancel)
        try:
            return self._checked_in_line(request, client, cancel)
        except BaseException:
            self._forget(session, cancel)
            raise

    def _forget(self, session: str, cancel: threading.Event) -> None:
        """The session's cancel no longer reaches this request (it ended or was refused)."""
        with self._active_lock:
            flags = self._active.get(session, set())
            flags.discard(cancel)
            if not flags:
                self._active.pop(session, None)

    def _checked_in_line(
        self, request: GenerationRequest, client: str | None, cancel: threading.Event
    ) -> tuple[GenerationRequest, _Ticket]:
        try:
            self._check_origins(request)  # before any file is opened
            request = request.checked()
            self.runner.admit(request)
        except (InvalidRequestError, ImageError) as err:
            raise ServiceError(str(err)) from None
        self._check_loras(request)
        if cancel.is_set():  # cancelled while it was checked: it takes no place in the line
            raise Cancelled([])
        return request, self._line.join(client, cancel)

    def _check_origins(self, request: GenerationRequest) -> None:
        """Every file the request names is an upload of this app (with ``upload_roots``) and a
        regular file of an allowed size (:func:`~pulid.serve.uploads.check_upload`)."""
        if not isinstance(request, GenerationRequest):
            raise InvalidRequestError("A request must be a GenerationRequest.")
        for image in request.image_files():
            check_upload(image.path, self.upload_roots)

    def _run_admitted(
        self,
        request: GenerationRequest,
        ticket: _Ticket,
        session: str,
        progress: Progress | None,
    ) -> ServiceResult:
        cancel = ticket.cancel
        saved: list[SavedImage] = []

        def report(info: StepInfo | str | SavedImage) -> None:
            if cancel.is_set():
                raise GenerationCancelled
            if progress is not None:
                progress(info)

        def save(generated: GeneratedImage) -> None:
            report(stages.SAVING)
            saved.append(self._save(generated, request))
            if progress is not None:
                progress(saved[-1])  # delivered even if a cancel comes next: it is finished

        try:
            self._line.wait_turn(ticket, report)
            report(stages.STARTING)  # a job cancelled just as its turn came stops here
            request = request.decoded()  # the files, read at the job's turn
            debug_images = self.runner.generate(request, report, save)
        except GenerationCancelled:
            raise Cancelled(saved) from None
        except ServiceError:
            raise
        except UserError as err:  # no face, an unreadable image, a LoRA that does not fit: for the user
            raise ServiceError(str(err)) from None
        except torch.OutOfMemoryError:
            logger.exception("out of GPU memory")
            self.release_memory()
            raise ServiceError(OOM_MESSAGE) from None
        except Exception:  # a bug or a broken machine: logged once, and the visitor told plainly
            logger.exception("a generation failed")
            raise ServiceError(FAILED_MESSAGE) from None
        finally:
            self._line.leave(ticket)
            self._forget(session, cancel)
            trim_host_memory()
        return ServiceResult(images=saved, debug_images=debug_images)

    def _save(self, generated: GeneratedImage, request: GenerationRequest) -> SavedImage:
        with self._saving:
            try:
                path = save_new_image(
                    generated.image,
                    generated.metadata,
                    self.output_dir,
                    next(self._counter),
                    fmt=request.output_format,
                    quality=request.quality,
                )
            except OSError as err:  # a full disk, the folder removed while serving
                logger.error("could not save an image in %s: %s", self.output_dir, err)
                raise ServiceError(
                    f"The image could not be saved on the server ({err.strerror or err}); the server's "
                    "outputs folder needs attention."
                ) from None
            prune_outputs(self.output_dir, self.keep_outputs)
        return SavedImage(path, generated.seed, generated.metadata, generated.face_similarity)

    @staticmethod
    def release_memory() -> None:
        """Give freed GPU memory back after an error (out of memory above all), so the next job has it."""
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
