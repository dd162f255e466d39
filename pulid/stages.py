"""The stages a generation reports, declared once.

The pipeline, the service and the runners report these names (``on_stage``, the service's
progress); the app places each on its progress bar with :data:`PROGRESS`. A waiting request reports
:func:`waiting_in_line` instead, which has done nothing yet.
"""

from __future__ import annotations

import time
from collections.abc import Callable

STARTING = "starting"
WAITING_FOR_WORKER = "waiting for a GPU worker"  # Ray Serve: the job is routed to a replica
LOADING_LORAS = "loading LoRAs"
ENCODING_PROMPT = "encoding the prompt"
READING_FACE = "reading the face"
READING_FACES = "reading the faces"  # several people
ENCODING_PHOTO = "encoding the photo to start from"
DECODING = "decoding"
MEASURING_LIKENESS = "measuring the likeness"
SAVING = "saving"

# Where a request stands when each stage starts (the progress bar's fill). The denoising steps
# fill DENOISE_SPAN, between the stages before them and decoding.
PROGRESS = {
    STARTING: 0.0,
    WAITING_FOR_WORKER: 0.0,
    LOADING_LORAS: 0.005,
    ENCODING_PROMPT: 0.01,
    READING_FACE: 0.03,
    READING_FACES: 0.03,
    ENCODING_PHOTO: 0.04,
    DECODING: 0.9,
    MEASURING_LIKENESS: 0.96,
    SAVING: 0.98,
}
DENOISE_SPAN = (0.05, 0.9)


WAITING_PREFIX = "waiting for the GPU"
MIN_FILL_FOR_ESTIMATE = 0.1  # the time left is guessed once a tenth is done (after the first steps)


def waiting_in_line(ahead: int) -> str:
    """What a request waiting for its turn reports."""
    return f"{WAITING_PREFIX}: {ahead} ahead"


def progress_of(stage: str) -> float:
    """The bar's fill when ``stage`` starts; 0 for a request still waiting in line."""
    return PROGRESS.get(stage, 0.0)


class RequestProgress:
    """A request's progress bar from what it reports: the fill (0-1) and text for each stage name
    and denoising step, or None where the bar stays as it is ("decoding" before each decoder
    block). Steps count the whole request (the pipeline counts its passes together), and the
    stages of an image finished while more steps are to come (its decoding, saving) leave the bar
    where the steps put it, so it only moves forward."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.fill = 0.0
        self.stage: str | None = None
        self.denoising = False
        self.text = "checking the request"  # what the request is doing, for a status line
        self._clock = clock
        self.started = clock()  # the click, as near as the server knows it
        self.running_since: float | None = None  # its turn came

    def elapsed(self) -> float:
        """Seconds since the request came."""
        return self._clock() - self.started

    def seconds_left(self) -> float | None:
        """An estimate of the seconds to the end, from how fast the fill has grown since the turn
        came; None while waiting or too early to tell (under a tenth done)."""
        if self.running_since is None or self.fill < MIN_FILL_FOR_ESTIMATE:
            return None
        spent = self._clock() - self.running_since
        return spent * (1.0 - self.fill) / self.fill

    def update(self, info) -> tuple[float, str] | None:
        """``info``: a stage name, or a step (``step`` of ``total``)."""
        if isinstance(info, str):
            if info == self.stage:
                return None
            self.stage = info
            if not self.denoising:
                self.fill = max(self.fill, progress_of(info))
            return self._shown(info, waiting=info.startswith(WAITING_PREFIX) or info == WAITING_FOR_WORKER)
        self.stage = "denoising"
        self.denoising = info.step + 1 < info.total  # more steps to come, of this image or the next
        low, high = DENOISE_SPAN
        self.fill = max(self.fill, low + (high - low) * (info.step + 1) / info.total)
        return self._shown(f"denoising step {info.step + 1}/{info.total}")

    def _shown(self, text: str, waiting: bool = False) -> tuple[float, str]:
        if not waiting and self.running_since is None:
            self.running_since = self._clock()
        self.text = text
        return self.fill, text
