"""The app's one entry point into the pipeline: raw UI values in, a saved image or a clear message out.

It turns what a browser sends (strings, numpy arrays, uploaded file paths) into a
:class:`~pulid.pipeline.GenerationRequest`, runs it with progress and cancellation, writes the PNG
with its settings, and turns every expected failure (bad input, no face, cancelled, out of GPU
memory) into a :class:`ServiceError` whose message a user can act on. The UI code only wires
controls to :meth:`GenerationService.run`.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
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
from pulid.outputs import output_name, save_png
from pulid.pipeline import PuLIDFluxPipeline
from pulid.request import GenerationRequest, InvalidRequestError
from pulid.uploads import UploadError, load_upload

logger = logging.getLogger(__name__)

OOM_MESSAGE = (
    "The GPU ran out of memory. Try a smaller width and height, a shorter T5 length, true CFG scale 1, "
    "or start the app with --offload."
)


class ServiceError(Exception):
    """An expected failure with a message for the user."""


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
        self._cancel: dict[str, threading.Event] = {}

    def cancel(self, session: str) -> None:
        event = self._cancel.get(session)
        if event is not None:
            event.set()

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
        progress: Callable[[StepInfo], None] | None = None,
    ) -> ServiceResult:
        try:
            request = request.checked()
        except InvalidRequestError as err:
            raise ServiceError(str(err)) from None
        cancel = self._cancel.setdefault(session, threading.Event())
        cancel.clear()

        def on_step(info: StepInfo) -> None:
            if cancel.is_set():
                raise GenerationCancelled
            if progress is not None:
                progress(info)

        with self._lock:
            try:
                result = self.pipeline.generate(request, callback=on_step)
            except GenerationCancelled:
                raise ServiceError("Generation cancelled.") from None
            except PuLIDError as err:  # no face, unreadable image: the message is for the user
                raise ServiceError(err.user_message) from None
            except InvalidRequestError as err:
                raise ServiceError(str(err)) from None
            except torch.OutOfMemoryError:
                logger.exception("out of GPU memory")
                self.release_memory()
                raise ServiceError(OOM_MESSAGE) from None
            finally:
                self._cancel.pop(session, None)
                trim_host_memory()
        path = save_png(result.image, result.metadata, self.output_dir / output_name(result.metadata))
        return ServiceResult(
            path=path, seed=result.seed, debug_images=result.debug_images, metadata=result.metadata
        )

    @staticmethod
    def release_memory() -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
