"""Generations on a ZeroGPU Space: the GPU work as a function of plain data that ``spaces.GPU`` runs.

On ZeroGPU (``SPACES_ZERO_GPU`` set by Hugging Face) the app process has no GPU. The models are
placed on ``cuda`` at start-up as usual: ``spaces`` keeps them in host memory and moves them into a
worker process that it forks for each GPU slice it grants. Every call of a ``spaces.GPU`` function
runs in that worker, so:

- its arguments and what it yields are pickled between the processes: the request (its photos
  decoded), then steps, stage names and finished images; no callbacks cross, and the service's
  line, cancel flags and output folder stay in the app process;
- the worker reads the pipeline from this module (:func:`use_pipeline`, called before the first
  request; a forked worker inherits it);
- the slice is booked for :func:`gpu_seconds` of the request, estimated from its steps, size, true
  CFG and number of images; a request that could not finish within :data:`MAX_GPU_SECONDS` is
  refused before it is queued;
- closing the generator (a cancel) makes ``spaces`` close it in the worker, which stops the
  generation at its next step or decoder block;
- an error other than ``gradio.Error`` reaches the app only as its class name, so expected
  failures travel as a :class:`~pulid.serve.events.Failed` event with their message for the user
  (:mod:`pulid.serve.events`).

Outside a Space, ``spaces.GPU`` returns the function unchanged and :class:`ZeroGPURunner` runs it
in the calling process: the same code, the same images.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

try:  # first: on ZeroGPU, ``spaces`` must patch torch before CUDA is touched
    import spaces
except ImportError:  # a local install without it: nothing to schedule
    spaces = None

import numpy as np
import torch

from flux.aot import AheadOfTime, compile_ahead
from flux.sampling import StepInfo, image_to_image_start
from pulid.pipeline import GeneratedImage, PuLIDFluxPipeline
from pulid.request import GenerationRequest, InvalidRequestError
from pulid.serve.events import Event, consume, generation_events
from pulid.serve.service import Runner

logger = logging.getLogger(__name__)

ON_ZERO_GPU = os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")  # as spaces reads it

# The estimate of a request's GPU time, from BENCHMARKS.md (resident bf16, eager, H200: 174 ms per
# DiT step at 896x1152 = 4,032 image tokens, 5.4 s per 28-step image). A ZeroGPU "large" slice is
# an H200 MIG 3g.71gb, 60 of the H200's 132 multiprocessors (spaces 0.51's defaults), so the step
# and decode figures are those times 2.2; the fixed part covers a worker's start, moving the
# weights in, and the text and ID stages. torch.compile is not available there: eager figures.
REFERENCE_TOKENS = 4032
STEP_SECONDS = 0.40  # one DiT pass at REFERENCE_TOKENS image tokens
DECODE_SECONDS = 0.5  # one decode (and likeness check) at that size
FIXED_SECONDS = 20.0
MARGIN = 1.25  # booked over the estimate, so a slow call is not cut off at its last step
MAX_GPU_SECONDS = 300  # the longest slice a request may ask for; larger ones are refused at once


def gpu_seconds(request: GenerationRequest) -> int:
    """The seconds of GPU to book for ``request``: DiT passes scaled by image tokens (attention
    grows faster than the rest), decodes per image, and the fixed stages, with a margin."""
    ratio = request.image_tokens / REFERENCE_TOKENS
    per_pass = STEP_SECONDS * ratio * (0.85 + 0.15 * ratio)  # attention is about 15% of a step here
    steps = request.num_steps  # those that run: from a photo, only the last ``strength`` of them
    if request.init_image is not None:
        steps -= image_to_image_start(request.num_steps, request.strength)
    negative = max(0, steps - request.cfg_start_step) if request.uses_true_cfg else 0
    passes = (steps + negative) * request.num_images
    decodes = DECODE_SECONDS * ratio * request.num_images
    return int(np.ceil(MARGIN * (FIXED_SECONDS + passes * per_pass + decodes)))


_pipeline: PuLIDFluxPipeline | None = None


def use_pipeline(pipeline: PuLIDFluxPipeline) -> None:
    """The pipeline the GPU function runs (set in the app process before any request)."""
    global _pipeline
    _pipeline = pipeline


def _the_pipeline() -> PuLIDFluxPipeline:
    if _pipeline is None:
        raise RuntimeError("pulid.serve.zerogpu.use_pipeline was not called before the GPU work")
    return _pipeline


def _generate(request: GenerationRequest) -> Iterator[Event]:
    """The GPU work of one request, as picklable events (:func:`pulid.serve.events.generation_events`)."""
    yield from generation_events(_the_pipeline(), request)


generate_on_gpu = _generate if spaces is None else spaces.GPU(_generate, duration=gpu_seconds)

# --compile on ZeroGPU: the blocks are compiled ahead of time, in one GPU slice at start-up, for
# these sizes (the official default and the square preset; other sizes run uncompiled). About
# 80 s a size on an H100 (BENCHMARKS.md); packages already in the folder are not built again.
AOT_SIZES = ((896, 1152), (1024, 1024))  # both are presets of the page (tested)
AOT_SECONDS = 900


def aot_folder() -> Path:
    """Where the packages go: the persistent disk when the Space has one (kept across restarts)."""
    root = Path("/data") if Path("/data").is_dir() else Path(tempfile.gettempdir())
    return root / "pulid-flux-aot"


def _build_ahead(folder: str, photo: np.ndarray, sizes: tuple[tuple[int, int], ...]) -> list[str]:
    """(In a GPU slice.) The pipeline's blocks compiled into packages in ``folder`` while one
    short generation runs at each size; returns the keys built."""
    pipeline = _the_pipeline()
    backend = AheadOfTime(folder, "build")
    compile_ahead(pipeline.compiled_blocks(), backend)
    for width, height in sizes:
        pipeline.generate(
            GenerationRequest(prompt="", id_images=[photo], width=width, height=height, num_steps=2, seed=0)
        )
    return backend.built


build_ahead_on_gpu = _build_ahead if spaces is None else spaces.GPU(_build_ahead, duration=AOT_SECONDS)


def prepare_ahead_of_time(
    pipeline: PuLIDFluxPipeline,
    photo: np.ndarray,
    folder: str | os.PathLike | None = None,
    sizes: tuple[tuple[int, int], ...] = AOT_SIZES,
) -> AheadOfTime:
    """``--compile`` on ZeroGPU (:mod:`flux.aot`): build the packages in a GPU slice now, then
    compile the blocks here with the backend that loads them, which each GPU worker inherits.
    ``photo`` has a face, so that the ID cross-attentions are built too."""
    folder = Path(folder) if folder is not None else aot_folder()
    use_pipeline(pipeline)
    built = build_ahead_on_gpu(str(folder), photo, tuple(sizes))
    logger.info("ahead-of-time packages in %s: %d built now", folder, len(built))
    torch._dynamo.reset()  # outside ZeroGPU the build ran here: forget its compiled frames
    backend = AheadOfTime(folder, "load")
    logger.info("the packages' one-time set-up took %.1f s here, for every worker", backend.prepare())
    compile_ahead(pipeline.compiled_blocks(), backend)
    return backend


class ZeroGPURunner(Runner):
    """Runs the service's generations through :data:`generate_on_gpu` (see the module's docstring)."""

    def __init__(self, pipeline: PuLIDFluxPipeline, max_seconds: int = MAX_GPU_SECONDS):
        use_pipeline(pipeline)
        self.max_seconds = max_seconds

    def admit(self, request: GenerationRequest) -> None:
        """Refuse a request whose GPU slice would be longer than a ZeroGPU call may be."""
        seconds = gpu_seconds(request)
        if seconds > self.max_seconds:
            raise InvalidRequestError(
                f"This request would need about {seconds} s of GPU time and a ZeroGPU call may take "
                f"at most {self.max_seconds} s: use fewer steps or images, a smaller size, or true "
                "CFG scale 1."
            )

    def generate(
        self,
        request: GenerationRequest,
        report: Callable[[StepInfo | str], None],
        on_image: Callable[[GeneratedImage], None],
    ) -> list[np.ndarray]:
        """The request's images, each handed to ``on_image``; returns the face crops. ``report``
        may raise :class:`~flux.sampling.GenerationCancelled`, which closes the GPU call."""
        return consume(generate_on_gpu(request), report, on_image)
