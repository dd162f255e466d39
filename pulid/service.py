"""The app's one entry point into the pipeline: raw UI values in, a saved image or a clear message out.

It turns what a browser sends (strings, numpy arrays, uploaded file paths) into a
:class:`~pulid.pipeline.GenerationRequest`, runs it with progress and cancellation, writes the PNG
with its settings, and turns every expected failure (bad input, no face, cancelled, out of GPU
memory) into a :class:`ServiceError` whose message a user can act on. The UI code only wires
controls to :meth:`GenerationService.run`.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import gc
import itertools
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flux.sampling import GenerationCancelled, StepInfo
from pulid.errors import PuLIDError
from pulid.limits import MAX_EXTRA_PHOTOS
from pulid.outputs import save_new_png
from pulid.pipeline import PuLIDFluxPipeline
from pulid.request import GenerationRequest, InvalidRequestError
from pulid.uploads import UploadError, load_upload

logger = logging.getLogger(__name__)

OOM_MESSAGE = (
    "The GPU ran out of memory. Try a smaller width and height, a shorter T5 length, true CFG scale 1, "
    "or start the app with --offload."
)


CANCELLED = "Generation cancelled."


class ServiceError(Exception):
    """An expected failure with a message for the user."""


class Job:
    """One generation running in a worker thread (see :meth:`GenerationService.start`)."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self._done = threading.Event()
        self._result: ServiceResult | None = None
        self._error: BaseException | None = None

    def _work(self, run: Callable[[], ServiceResult]) -> None:
        try:
            self._result = run()
        except BaseException as err:  # noqa: BLE001 - handed to the waiting caller
            self._error = err
        finally:
            self._done.set()

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
class ServiceResult:
    path: Path
    seed: int
    debug_images: list[np.ndarray]
    metadata: dict


def trim_host_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise, after a large photo)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):  # not glibc (e.g. musl): nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class GenerationService:
    """Holds one pipeline, serialises requests on it, and keeps per-session cancel flags."""

    def __init__(
        self,
        pipeline: PuLIDFluxPipeline,
        output_dir: str | os.PathLike | None = None,
        upload_roots: Sequence[str | os.PathLike] | None = None,
    ):
        """``upload_roots``: the only folders file inputs may come from (the app passes gradio's
        upload cache); ``None`` accepts any regular file (local use)."""
        self.pipeline = pipeline
        self.upload_roots = None if upload_roots is None else [Path(root) for root in upload_roots]
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="pulid-flux-outputs-"))
        self._lock = threading.Lock()
        self._counter = itertools.count(1)  # numbers this service's images in its output folder
        self._active: dict[str, set[threading.Event]] = {}  # session -> cancel flags of its jobs
        self._active_lock = threading.Lock()

    def cancel(self, session: str) -> None:
        """Stop every job of ``session`` at its next step or block; other sessions' jobs go on."""
        with self._active_lock:
            for flag in self._active.get(session, ()):
                flag.set()

    def start(
        self,
        request: GenerationRequest,
        session: str = "default",
        progress: Callable[[StepInfo | str], None] | None = None,
    ) -> Job:
        """:meth:`run` in a worker thread: the caller can wait with a timeout and cancel the job.

        The thread runs in a copy of the caller's context (gradio's progress reporting lives in
        context variables).
        """
        job = Job()
        context = contextvars.copy_context()
        thread = threading.Thread(
            target=context.run,
            args=(job._work, lambda: self.run(request, session, progress, cancel=job.cancelled)),
            name=f"generation-{session[:8]}",
            daemon=True,
        )
        thread.start()
        return job

    def build_request(
        self, id_image: np.ndarray | None, extra_images: Sequence[str] | None, **settings
    ) -> GenerationRequest:
        """A request from what the browser sent: the photo, uploaded file paths and raw setting values."""
        extra_images = list(extra_images or [])
        if len(extra_images) > MAX_EXTRA_PHOTOS:
            raise ServiceError(
                f"{len(extra_images)} extra photos were sent; at most {MAX_EXTRA_PHOTOS} can be used: "
                "keep the best."
            )
        photos = [] if id_image is None else [np.asarray(id_image)]
        try:
            photos += [load_upload(path, self.upload_roots) for path in extra_images]
        except UploadError as err:
            raise ServiceError(str(err)) from None
        try:
            return GenerationRequest.from_values(id_images=photos, **settings)
        except InvalidRequestError as err:
            raise ServiceError(str(err)) from None

    def run(
        self,
        request: GenerationRequest,
        session: str = "default",
        progress: Callable[[StepInfo | str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> ServiceResult:
        """Generate and save one image; ``progress`` gets each step (:class:`StepInfo`) and the name
        of each stage. ``cancel`` (or :meth:`cancel` of the session) stops it at the next step or
        decoder block, also while it waits for another job to finish."""
        try:
            request = request.checked()
        except InvalidRequestError as err:
            raise ServiceError(str(err)) from None
        cancel = cancel if cancel is not None else threading.Event()
        with self._active_lock:
            self._active.setdefault(session, set()).add(cancel)

        def report(info: StepInfo | str) -> None:
            if cancel.is_set():
                raise GenerationCancelled
            if progress is not None:
                progress(info)

        try:
            with self._lock:
                report("starting")  # a job cancelled while it waited for the GPU stops here
                result = self.pipeline.generate(request, callback=report, on_stage=report)
        except GenerationCancelled:
            raise ServiceError(CANCELLED) from None
        except PuLIDError as err:  # no face, unreadable image: the message is for the user
            raise ServiceError(err.user_message) from None
        except InvalidRequestError as err:
            raise ServiceError(str(err)) from None
        except torch.OutOfMemoryError:
            logger.exception("out of GPU memory")
            self.release_memory()
            raise ServiceError(OOM_MESSAGE) from None
        finally:
            with self._active_lock:
                flags = self._active.get(session, set())
                flags.discard(cancel)
                if not flags:
                    self._active.pop(session, None)
            trim_host_memory()
        path = save_new_png(result.image, result.metadata, self.output_dir, next(self._counter))
        return ServiceResult(
            path=path, seed=result.seed, debug_images=result.debug_images, metadata=result.metadata
        )

    @staticmethod
    def release_memory() -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
