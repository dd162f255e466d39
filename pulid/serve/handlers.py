"""What the page's events do: a request's run and its status line, cancel, the galleries, the
size and canvas helpers. :func:`pulid.serve.gradio_app.create_demo` lays out the page and wires
each control to one of these.

No ``from __future__ import annotations`` here: gradio finds the ``gr.Request`` and
``gr.SelectData`` parameters of a handler by their annotations, which must be the classes
themselves, or every visitor would share one session.
"""

import argparse
import asyncio
import collections
import contextlib
import inspect
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import gradio as gr
from gradio import processing_utils
from gradio.utils import get_upload_folder
from PIL import Image

from pulid import stages
from pulid.catalogue import SPEED_LORAS
from pulid.images import ImageError, ImageFile
from pulid.limits import MAX_PEOPLE
from pulid.request import (
    LORA_STRENGTH,
    PERSON_WEIGHT,
    SIZE_PRESETS,
    GenerationRequest,
    InvalidRequestError,
    Person,
    check_person_photo_count,
    size_for_photo,
)
from pulid.serve.components import LORA_ROWS, cancelled, refused
from pulid.serve.service import Cancelled, GenerationService, SavedImage, ServiceError
from pulid.serve.uploads import uploaded_image
from pulid.serve.web_guard import visitor
from pulid.similarity import NO_ID_PHOTO, SCALE, rounded

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often a job's handler looks at its job (and at most sends its status line)
KEEPALIVE_SECONDS = 5.0  # the status line is sent at least this often: how soon a departed visitor's
# job stops
CANVAS_SIDE = 512  # the long side of the blank canvas regions are painted on without a photo
HISTORY_SIZE = 48  # images the session gallery keeps (the files stay in the outputs folder)
PAGE_COPIES_KEPT = 1024  # saved images whose copy in gradio's cache the app remembers
NO_LORA = ("(none)", "")


def page_request(values: dict, upload_roots: Sequence[Path] | None) -> GenerationRequest:
    """The request the page sent, built as every front door builds one
    (:meth:`~pulid.request.GenerationRequest.from_values`): its settings, and its files as uploads
    of this app (checked to come from ``upload_roots`` before anything opens them, read at the
    job's turn). Refusals are :class:`~pulid.serve.service.ServiceError`."""
    values = dict(values)

    def upload(path: str | None) -> ImageFile | None:
        return None if path is None else uploaded_image(path, upload_roots)

    photo, extra = values.pop("id_image"), values.pop("extra_images")
    start, mask = values.pop("init_image"), values.pop("mask")
    drawn, painted = values.pop("mask_drawing"), values.pop("region_drawing")
    photos = ([] if photo is None else [photo]) + list(extra or [])
    values["loras"] = chosen_loras(values)
    try:
        check_person_photo_count(1, len(photos))  # before looking at any file
        one_mask = painted_or_uploaded(
            drawn, upload(mask), "Give one mask: clear the drawing, or remove the uploaded mask."
        )
        people, id_region = chosen_people(values, painted, upload)
        return GenerationRequest.from_values(
            id_images=[upload(path) for path in photos],
            init_image=upload(start),
            mask=one_mask,
            more_people=people,
            id_region=id_region,
            **values,
        )
    except (InvalidRequestError, ImageError) as err:
        raise ServiceError(str(err)) from None


def chosen_people(
    values: dict, painted: list | None, upload: Callable[[str | None], ImageFile | None]
) -> tuple[list[Person], object]:
    """Take the people's inputs out of ``values``: person 1's region, and a
    :class:`~pulid.request.Person` for each other row with photos, in row order (each file through
    ``upload``). ``painted`` (each person's region painted in the page, person 1 first) counts as
    uploaded; a painted and an uploaded region for one person, or a region for a row without
    photos, is refused. Regions count with the 'masks' layout only: the page hides them otherwise,
    so they are left out."""
    use_regions = str(values.get("layout") or "").strip().lower() == "masks"
    painted = list(painted or []) + [None] * MAX_PEOPLE

    def region_of(number: int, uploaded):
        if not use_regions:
            return None
        refusal = f"Person {number} has a painted region and an uploaded one: keep one."
        return painted_or_uploaded(painted[number - 1], upload(uploaded), refusal)

    id_region = region_of(1, values.pop("id_region", None))
    people = []
    for number in range(2, MAX_PEOPLE + 1):
        photos = values.pop(f"person_{number}", None)
        weight = values.pop(f"person_{number}_weight", None)
        region = region_of(number, values.pop(f"person_{number}_region", None))
        photos = [photos] if isinstance(photos, str) else list(photos or [])
        if not photos:
            if region is not None:
                raise ServiceError(f"Person {number} has a region but no photo: add their photo.")
            continue
        check_person_photo_count(number, len(photos))
        weight = PERSON_WEIGHT.default if weight is None else weight
        people.append(Person(tuple(upload(path) for path in photos), weight, region))
    return people, id_region


def painted_or_uploaded(painted, uploaded, refusal: str):
    """What was painted in the page or else what was uploaded; both is refused with ``refusal``."""
    if painted is not None and uploaded is not None:
        raise ServiceError(refusal)
    return painted if painted is not None else uploaded


def chosen_loras(values: dict) -> list[tuple[str, object]]:
    """Take the LoRA rows out of ``values``: (name, strength) of each row with a LoRA chosen (a
    missing strength is the declared default)."""
    chosen = []
    for row in range(1, LORA_ROWS + 1):
        name = values.pop(f"lora_{row}", None)
        strength = values.pop(f"lora_{row}_strength", None)
        if name:
            chosen.append((name, LORA_STRENGTH.default if strength is None else strength))
    return chosen


def with_signature(handler, names: list[str]):
    """The async generator ``handler(values, request, progress)`` as a function of the named inputs.

    Gradio reads the parameter names (the API's argument names), fills ``gr.Request`` and
    ``gr.Progress`` from the annotations, and passes the inputs positionally in ``names`` order;
    the values arrive as one dict. Every parameter defaults to None, so the API marks the photo
    inputs optional (the others show their controls' values as defaults).
    """
    parameters = [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for name in names
    ]
    parameters += [
        inspect.Parameter(
            "request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=gr.Request
        ),
        inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress()),
    ]
    signature = inspect.Signature(parameters)

    async def wired(*args, **kwargs):  # an async generator, as the handler: gradio can close it
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = {name: bound.arguments.get(name) for name in names}
        arguments = bound.arguments
        async for item in handler(values, arguments.get("request"), arguments.get("progress")):
            yield item

    wired.__signature__ = signature
    wired.__annotations__ = {"request": gr.Request}  # how gradio recognises the parameter to fill
    wired.__name__ = handler.__name__
    return wired


def face_files(images, folder: Path, keep: int = 96) -> list[str]:
    """The ``--dev`` face images as PNG files with names of their own, keeping the newest ``keep``.

    Gradio writes images given as arrays into its cache under a name made from their content,
    truncating and rewriting the file in place; two requests showing the same face at once (the
    same photo) would then serve a half-written file. Files are copied into the cache atomically.
    """
    import uuid

    paths = []
    for image in images:
        path = folder / f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
    for old in sorted(folder.glob("*.png"))[:-keep]:
        old.unlink(missing_ok=True)
    return paths


def caption(image) -> str:
    """What the gallery shows under an image: its seed and face similarity (or why there is none)."""
    return f"seed {image.seed} · face similarity {image.metadata['face_similarity']}"


def asked_for(values: dict) -> str:
    """A request's settings in a few words for the server's log (no prompt: it is the visitor's)."""
    size = f"{values.get('width')}x{values.get('height')}"
    photos = int(values.get("id_image") is not None) + len(values.get("extra_images") or [])
    return f"{size}, {values.get('num_steps')} steps, {values.get('num_images')} image(s), {photos} photo(s)"


def clock(seconds: float) -> str:
    """``7 s``, ``2 min 05 s``: a duration as the status line shows it."""
    whole = max(0, round(seconds))
    return f"{whole} s" if whole < 60 else f"{whole // 60} min {whole % 60:02d} s"


def status_line(bar) -> str:
    """What a request is doing, under Generate while it waits or runs: a bar, the stage (place in
    line, step k/n), the time since the click and, once a tenth is done, the time left. The two
    times are marked up for :data:`CLOCK_SCRIPT`, which keeps them ticking between updates (in
    tenths of a second, as a class: gradio's Markdown keeps classes and drops ``data-`` attributes)."""
    elapsed = bar.elapsed()
    parts = [
        f"**{bar.text[:1].upper()}{bar.text[1:]}**",
        f'<span class="job-clock t{elapsed * 10:.0f}">{clock(elapsed)}</span> since you clicked',
    ]
    if (left := bar.seconds_left()) is not None:
        parts.append(f'<span class="job-left t{left * 10:.0f}">about {clock(left)} left</span>')
    return f'<progress value="{bar.fill:.3f}" max="1"></progress> ' + " · ".join(parts)


def summary(images, cancelled: bool = False, random_models: bool = False) -> str:
    """The text beside the results: one line per image, how to read the face similarity (and that
    random models make it meaningless), what "no ID photo" means, and the LoRAs used (how they
    were applied, and any text-encoder layers that were not)."""
    lines = [f"- `{image.path.name}`: {caption(image)}" for image in images]
    if any(image.face_similarity is not None for image in images):
        lines.append(
            f"\n{SCALE}" + (" With random models the number means nothing." if random_models else "")
        )
    if images and all(int(i.metadata.get("num_id_images", 0)) == 0 for i in images):
        lines.append(f"\n{NO_ID_PHOTO}: these are plain FLUX.1-dev images.")
    full = images[0].metadata.get("cache_full_steps") if images else None
    if full:
        lines.append(f"\nStep cache: {full} steps ran in full (the others reused the later blocks).")
    loras = images[0].metadata.get("loras") if images else None
    if loras:
        used = ", ".join(f"{lora['name']} ({lora['strength']:g})" for lora in loras)
        ignored = [f"{lora['name']}: {lora['ignored']}" for lora in loras if lora.get("ignored")]
        lines.append(f"\nLoRAs: {used}, {images[0].metadata.get('lora_mode', '')}.")
        if ignored:
            lines.append(f"Text-encoder layers not applied ({'; '.join(ignored)}).")
    if cancelled:
        lines.append("\n**Cancelled.** The images above were finished before the cancel.")
    return "\n".join(lines)


def details(images) -> list[dict]:
    """Per image: file name, seed, face similarity and settings (the API's JSON output)."""
    return [
        {
            "file": image.path.name,
            "seed": image.seed,
            "face_similarity": rounded(image.face_similarity),
            "settings": image.metadata,
        }
        for image in images
    ]


def visitor_of(request, behind_proxy: bool) -> str:
    """Who sent the request (:func:`pulid.serve.web_guard.visitor`): their share of the line counts by it."""
    client = getattr(request, "client", None)
    headers = getattr(request, "headers", None) or {}
    forwarded = headers.get("x-forwarded-for")
    return visitor(getattr(client, "host", None), forwarded, behind_proxy, session_of(request))


NO_SESSION = (
    "This request came without a session, so it could not be cancelled or counted as yours: use the "
    "page, or gradio_client (which opens one)."
)


def session_of(request) -> str:
    """The caller's session: cancel flags are kept per session, so a visitor stops only their own
    job. A request without one (a raw POST to a ``/run`` route) is refused with a message."""
    session = getattr(request, "session_hash", None)
    if not session:
        raise refused(NO_SESSION)
    return session


class PageHandlers:
    """The page's event handlers for one app: its service, its flags, the images' copies on the
    page and (with ``--dev``) the folder of face images, removed when the app stops."""

    def __init__(self, service: GenerationService, args: argparse.Namespace) -> None:
        self.service = service
        self.args = args
        self.faces = tempfile.TemporaryDirectory(prefix="pulid-flux-faces-") if args.dev else None
        self._page_copies: collections.OrderedDict[Path, str] = collections.OrderedDict()
        self._copies_lock = threading.Lock()

    async def generate(self, values: dict, request: gr.Request, progress: gr.Progress):
        """:meth:`run_request`, with one line in the server's log for each request: who sent it,
        what it asked for, how it ended and after how long."""
        started, ended = time.monotonic(), ["stopped: the visitor cancelled or left"]
        asked = asked_for(values)
        steps = self.run_request(values, request, progress, ended)
        try:
            async for update in steps:
                yield update
        finally:
            await steps.aclose()  # its own ``finally`` stops the job when the visitor goes
            who = getattr(getattr(request, "client", None), "host", None) or "an unknown address"
            logger.info(
                "request from %s (%s): %s, after %.1f s", who, asked, ended[0], time.monotonic() - started
            )

    async def run_request(self, values: dict, request, progress, ended: list[str]):
        """Runs the job in the service's worker thread and waits for it without holding a server
        thread. The status line under Generate is sent when what it says changes (the place in
        line, the stage, the step: at most every POLL_SECONDS) and otherwise every
        KEEPALIVE_SECONDS, which is also how soon gradio closes this generator when the visitor
        leaves; the ``finally`` then stops the work or takes the job out of the line. (A message
        every POLL_SECONDS from each of 33 waiting jobs made a full server unresponsive.) The job's
        end is seen at once, not at the next look. ``ended[0]`` is set to how the request ended,
        for the log."""
        service, args = self.service, self.args
        saved: list[SavedImage] = []
        bar = stages.RequestProgress()

        def show(info) -> None:
            """The status line's state, and gradio's progress for API clients."""
            if isinstance(info, SavedImage):
                saved.append(info)
            elif (shown := bar.update(info)) is not None:
                progress(shown[0], desc=shown[1])

        def admit():
            """Check the request and put it in line: file headers, the LoRA folder, the hub's
            reachability; in a thread, so that no visitor's page waits on them."""
            session, client = session_of(request), visitor_of(request, args.behind_proxy)
            with service.admitting(session) as cancel:  # a Cancel from now on reaches it
                sent = page_request(values, service.upload_roots)
                return service.start(sent, session, show, client=client, cancel=cancel)

        def status(text: str | None = None):
            """Only the status line (the summary box) changes."""
            return (gr.skip(), status_line(bar) if text is None else text, *(gr.skip(),) * 4)

        session_of(request)  # a request without one is refused before anything is said or done
        yield status()  # on the page at once, before the request's files are checked
        admission = asyncio.ensure_future(asyncio.to_thread(admit))
        try:
            job = await asyncio.shield(admission)
        except Cancelled as err:  # by the visitor's Cancel while its files were checked
            ended[0] = "cancelled while it was checked"
            yield status("**Cancelled.**")
            raise cancelled(str(err)) from None
        except ServiceError as err:
            ended[0] = f"refused ({str(err)[:120]})"
            yield status("")  # no clock ticking on under the refusal's message
            raise refused(str(err)) from None
        except asyncio.CancelledError:  # cancelled or gone while it was checked: its job goes too
            admission.add_done_callback(lambda done: done.exception() or done.result().cancel())
            raise

        def outputs(result=None, cancelled=False):
            images = list(saved)
            files = [self.on_page(i.path) for i in images]
            finished = result is not None or cancelled
            return (
                list(zip(files, map(caption, images), strict=True)),
                summary(images, cancelled, args.preset == "tiny-random") if finished else status_line(bar),
                files,
                details(images),
                gr.skip()
                if result is None or not args.dev
                else face_files(result.debug_images, Path(self.faces.name)),
                images,
            )

        loop, finished = asyncio.get_running_loop(), asyncio.Event()
        job.when_done(lambda: loop.call_soon_threadsafe(finished.set))
        shown, said, said_at = 0, None, time.monotonic()
        try:
            while not job.wait(0):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(finished.wait(), POLL_SECONDS)
                if job.wait(0):
                    break
                if len(saved) > shown:  # an image of the batch is ready: show it now
                    shown = len(saved)
                    yield outputs()
                elif bar.text != said or time.monotonic() - said_at >= KEEPALIVE_SECONDS:
                    yield status()
                else:
                    continue
                said, said_at = bar.text, time.monotonic()
            try:
                result = job.result()
            except Cancelled as err:
                ended[0] = f"cancelled after {len(err.images)} image(s)"
                if not err.images:  # nothing finished: the API caller gets the error itself
                    yield status("**Cancelled.**")
                    raise cancelled(str(err)) from None
                yield outputs(cancelled=True)
                return
            except ServiceError as err:
                ended[0] = f"failed ({str(err)[:120]})"
                yield status("")
                raise refused(str(err)) from None
            ended[0] = f"made {len(saved)} image(s)"
            yield outputs(result)
        finally:
            job.cancel()  # nothing if it finished; otherwise the visitor cancelled or disconnected

    def cancel(self, request: gr.Request):
        """Stops the session's jobs through the service. Their own events then end and say
        "Cancelled" last, after the work stopped: had gradio cancelled the event instead, a status
        line already on its way could land after this answer and stay there, frozen mid-run."""
        session = getattr(request, "session_hash", None)
        if not session or self.service.cancel(session) == 0:
            return "Nothing to cancel: no generation of yours is running or waiting."
        return "**Cancelled.** Images finished before the cancel stay above."

    def on_page(self, path: Path) -> str:
        """A copy of a saved image in gradio's cache, which it hands out as it is. Gradio copies only
        from the working directory and the temp folder, so images in an --outputs_dir elsewhere (a
        Space's /data) were refused; allowing that folder instead would serve all of it to anyone.
        The copy is made once and reused while it lasts (touched, as gradio touches what it hands
        out again), so a batch and the history gallery do not hash every image at each update."""
        with self._copies_lock:
            copy = self._page_copies.get(path)
            if copy is not None and os.path.exists(copy):
                self._page_copies.move_to_end(path)
                with contextlib.suppress(OSError):
                    os.utime(copy)  # gradio's cache cleaner ages files by their time
                return copy
        copy = processing_utils.save_file_to_cache(path, get_upload_folder())
        with self._copies_lock:
            self._page_copies[path] = copy
            while len(self._page_copies) > PAGE_COPIES_KEPT:
                self._page_copies.popitem(last=False)
        return copy

    def add_to_history(self, latest, history):
        history = ([*latest, *history] if latest else history)[:HISTORY_SIZE]
        return history, [(self.on_page(i.path), caption(i)) for i in history]

    @staticmethod
    def pick(history, event: gr.SelectData):
        image = history[event.index]
        return image.seed, f"Selected: `{image.path.name}`, {caption(image)}", image.metadata

    def lora_choices(self, refresh: bool = False):
        return [NO_LORA, *((name, name) for name in self.service.lora_names(refresh))]

    def refresh_loras(self, *current):
        choices = self.lora_choices(refresh=True)
        known = {value for _, value in choices}
        return [gr.update(choices=choices, value=value if value in known else "") for value in current]


def size_of(preset):
    width, height = SIZE_PRESETS.get(preset, (gr.skip(), gr.skip()))
    return width, height


def match_photo(path, width, height):
    """The size sliders to the photo to start from's aspect ratio, at the area they had."""
    if path is None:
        return gr.skip(), gr.skip(), gr.skip()
    try:
        with Image.open(path) as photo:  # the header only: nothing is decoded
            size = photo.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return gr.skip(), gr.skip(), gr.skip()  # the service names the unreadable file on Generate
    new_width, new_height = size_for_photo(*size, int(width) * int(height))
    return new_width, new_height, "custom"


def canvas_background(photo, width, height):
    """What regions are painted over: the photo to start from, or a blank of the image's shape."""
    if photo is not None:
        return photo
    try:
        width, height = int(width), int(height)
    except (TypeError, ValueError):
        return gr.skip()  # a size being typed: the canvas waits for a whole number
    if min(width, height) < 16:
        return gr.skip()
    scale = CANVAS_SIDE / max(width, height)
    return Image.new("RGB", (round(width * scale), round(height * scale)), (200, 200, 200))


def photo_notice(photo):
    return gr.update(visible=photo is None)


def speed_preset(name):
    """Put the speed LoRA in the first row at its strength, with its steps and guidance."""
    lora = SPEED_LORAS[name]
    return name, lora.strength, lora.steps, lora.guidance
