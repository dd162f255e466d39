"""PuLID for FLUX: the Gradio app. The UI only wires controls to :class:`pulid.service.GenerationService`.

python app_flux.py                        # FLUX.1-dev + PuLID v0.9.1 on CUDA (downloads or models/)
python app_flux.py --preset tiny-random   # tiny random weights on CPU: noise, but the whole path runs

The controls are made from the declared generation settings (:mod:`pulid.request`). No
``from __future__ import annotations`` here: gradio finds the ``gr.Request`` parameter of a handler
by its annotation, which must be the class itself, or every visitor would share one session.
"""

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

from pulid import stages
from pulid.limits import (
    MAX_EXTRA_PHOTOS,
    MAX_JSON_BODY_BYTES,
    MAX_PEOPLE,
    MAX_QUEUED,
    MAX_QUEUED_PER_VISITOR,
    MAX_UPLOAD_BYTES,
    MAX_UPLOAD_BYTES_PER_HOUR,
    MIN_FREE_DISK_BYTES,
)
from pulid.similarity import rounded
from pulid.startup import (
    Parser,
    add_model_arguments,
    check_whole_pipeline_per_gpu,
    load_or_exit,
    path_argument,
)

logger = logging.getLogger("app_flux")

# Request bodies larger than JSON needs: a field's photos (or a painted layer) in one upload.
BODY_LIMITS = {"/gradio_api/upload": (MAX_EXTRA_PHOTOS + 1) * MAX_UPLOAD_BYTES + MAX_JSON_BODY_BYTES}
POLL_SECONDS = 0.5  # how often a job's handler looks at its job (and at most sends its status line)
STOP_SECONDS = 1.0  # what Ctrl+C or SIGTERM gives the server to close before the process ends
KEEPALIVE_SECONDS = 5.0  # the status line is sent at least this often: how soon a departed visitor's
# job stops
UPLOAD_CACHE = (600, 3600)  # every 10 minutes, delete uploads and outputs older than an hour
IN_SPACE = bool(os.environ.get("SPACE_ID"))  # Hugging Face Spaces set it; they need 0.0.0.0:7860
EXAMPLE_PHOTO = Path(__file__).resolve().parent / "example_inputs" / "astronaut.png"
SPACE_KEEP_OUTPUTS = 500  # a Space's disk is small and shared by every visitor
MIN_KEEP_OUTPUTS = 50  # below this a busy server could delete a batch before the visitor sees it
CANVAS_SIDE = 512  # the long side of the blank canvas regions are painted on without a photo
HISTORY_SIZE = 48  # images the session gallery keeps (the files stay in the outputs folder)
PAGE_COPIES_KEPT = 1024  # saved images whose copy in gradio's cache the app remembers
PAINTING_BY_ID = (
    "The painting came without its layers: send each painted layer as an uploaded file (the page "
    "does); drawings sent ahead of a request are not kept."
)
TINY_START = {"width": 256, "height": 256, "num_steps": 4}  # the tiny preset's page: an image in seconds
LORA_ROWS = 3  # LoRA pickers in the UI (the Python API and the CLI take up to MAX_LORAS_PER_REQUEST)
NO_LORA = ("(none)", "")
EXAMPLES = [  # prompt, ID start step, guidance, seed: photoreal scenes start at 4, stylised at 0-1
    ("portrait, color, cinematic", 0, 4.0, "42"),
    ("a woman in a red raincoat on a rainy Tokyo street at night, film photo, 35mm", 4, 4.0, "7"),
    ("portrait, pixar style, 3d render, soft light", 1, 4.0, "12"),
    ("watercolor painting of a woman in a sunflower field", 0, 4.0, "3"),
]
TIPS_FOR = ("start_step", "true_cfg")  # the settings whose advice the page shows under the controls


def tips() -> str:
    """The advice of :data:`TIPS_FOR`, as declared with each setting."""
    from pulid.request import generation_settings

    chosen = [s for s in generation_settings() if s.name in TIPS_FOR]
    return "\n".join(f"- **{s.label}**: {s.help}" for s in chosen)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(description="PuLID for FLUX.1-dev: put the face from a photo into new images")
    add_model_arguments(parser)
    default_port = int(os.environ.get("GRADIO_SERVER_PORT", 7860 if IN_SPACE else 8080))
    default_host = os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0" if IN_SPACE else "127.0.0.1")
    parser.add_argument("--port", type=PORT, default=default_port, help="port to serve on")
    parser.add_argument(
        "--host", default=default_host, help="interface to bind (0.0.0.0 exposes it to the network)"
    )
    parser.add_argument(
        "--share", action="store_true", help="create a public gradio.live link (off by default)"
    )
    parser.add_argument(
        "--allowed_hosts",
        default=None,
        help="comma-separated host names the app answers to ('*' any, '*.example.org' subdomains); "
        "default: local names when bound to 127.0.0.1, any name when bound to 0.0.0.0 or in a Space",
    )
    parser.add_argument(
        "--behind_proxy",
        action=argparse.BooleanOptionalAction,
        default=IN_SPACE,
        help="count visitors by the proxy's X-Forwarded-For entry (default: on in a Space)",
    )
    parser.add_argument(
        "--outputs_dir",
        type=path_argument,
        default=Path("outputs"),
        help="where images are saved",
    )
    parser.add_argument(
        "--keep_outputs",
        type=keep_count,
        default=SPACE_KEEP_OUTPUTS if IN_SPACE else 0,
        help="keep only the newest N images in --outputs_dir (0: all; default 0, "
        f"{SPACE_KEEP_OUTPUTS} in a Space; at least {MIN_KEEP_OUTPUTS})",
    )
    parser.add_argument(
        "--replicas",
        type=whole_number(1, 64),
        default=1,
        metavar="N",
        help="one whole pipeline on each of N GPUs (cuda:0 ... cuda:N-1): N visitors served at once",
    )
    parser.add_argument(
        "--ray",
        action="store_true",
        help="serve through Ray Serve (pip install -r requirements-serve.txt): --replicas N pipelines, "
        "one per GPU of a local Ray or of the cluster at --ray_address, behind this page and HTTP",
    )
    parser.add_argument(
        "--ray_address", default=None, help="with --ray: a Ray cluster to join ('auto': the local one)"
    )
    parser.add_argument(
        "--ray_http_port",
        type=PORT,
        default=8000,
        help="with --ray: port of the HTTP endpoint POST /generate",
    )
    parser.add_argument(
        "--dev", action="store_true", help="show the aligned and parsed face and CFG start step"
    )
    return parser.parse_args(argv)


def whole_number(low: int, high: int):
    """An argparse type: a whole number from ``low`` to ``high``, else the range in the error."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a whole number is needed (got {text!r})") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"from {low} to {high} (got {value})")
        return value

    return convert


PORT = whole_number(1, 65535)


def keep_count(text: str) -> int:
    """``--keep_outputs``: 0 (keep all) or enough that a finished batch is not deleted before it
    is shown."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number is needed (got {text!r})") from None
    if count != 0 and not MIN_KEEP_OUTPUTS <= count <= 10**7:
        raise argparse.ArgumentTypeError(f"0 (keep all) or from {MIN_KEEP_OUTPUTS} (got {count})")
    return count


def control(setting, gr, visible: bool = True, **options):
    """The Gradio control of one declared setting."""
    if setting.widget == "textbox":
        return gr.Textbox(
            value=str(setting.default),
            label=setting.label,
            info=setting.help or None,
            max_length=setting.max_length,
            visible=visible,
            **options,
        )
    if setting.widget == "radio":
        return setting_control_class(gr, gr.Radio)(
            choices=list(setting.choices),  # by keyword: gradio records a control's keywords
            value=setting.default,
            label=setting.label,
            info=setting.help or None,
            visible=visible,
            setting_name=setting.name,
            **options,
        )
    low, high = (
        (min(setting.choices), max(setting.choices))
        if setting.choices
        else (setting.minimum, setting.maximum)
    )
    return setting_control_class(gr, gr.Slider)(
        minimum=low,
        maximum=high,
        value=setting.default,
        step=setting.step,
        label=setting.label,
        info=setting.help or None,
        visible=visible,
        setting_name=setting.name,
        **options,
    )


@functools.cache
def setting_control_class(gr, base):
    """A slider or radio (``base``) whose value, from the page or the API, is checked by its
    declared setting: a wrong one (a string, NaN, out of range, not a choice) is refused with the
    setting named and the value cut short, where gradio's own check says "Value 0 is less than
    minimum value 256", echoes a megabyte of text or fails on a string."""
    from pulid.request import LORA_STRENGTH, PERSON_WEIGHT, generation_settings
    from pulid.settings import InvalidRequestError

    declared = {s.name: s for s in (*generation_settings(), LORA_STRENGTH, PERSON_WEIGHT)}

    class SettingControl(base):
        is_template = True

        def __init__(self, *, setting_name: str = "", **kwargs):
            # a constructor argument (a name, not the setting; keywords only, as gradio records
            # them): gradio rebuilds a component from them when an event updates it
            self.setting_name = setting_name
            super().__init__(**kwargs)

        def get_config(self, cls=None):
            return super().get_config(cls or base)  # the page's own control: the base's properties

        def preprocess(self, payload):
            try:
                return declared[self.setting_name].coerce(payload)
            except InvalidRequestError as err:
                raise refused(str(err)) from None

    SettingControl.__name__ = f"Setting{base.__name__}"
    return SettingControl


@functools.cache
def listed_choice_class(gr):
    """A dropdown whose value must be one of its listed choices (those of the visitor's page, after
    a refresh); anything else is refused with the control named and the value cut short."""

    from pulid.settings import shown

    class ListedChoice(gr.Dropdown):
        is_template = True

        def get_config(self, cls=None):
            return super().get_config(cls or gr.Dropdown)

        def preprocess(self, payload):
            listed = [value for _, value in self.choices]
            if payload in listed or (payload in (None, "") and "" in listed):
                return payload
            raise refused(
                f"{self.label} must be one of the listed choices (got {shown(payload)}): "
                "pick one from the list."
            )

    return ListedChoice


def lora_input_names() -> list[str]:
    """The LoRA rows' inputs: ``lora_1``, ``lora_1_strength``, ``lora_2``, ..."""
    return [name for row in range(1, LORA_ROWS + 1) for name in (f"lora_{row}", f"lora_{row}_strength")]


def people_input_names() -> list[str]:
    """The other people's inputs: ``person_2``, ``person_2_weight``, ``person_2_region``, ..."""
    return [
        name
        for number in range(2, MAX_PEOPLE + 1)
        for name in (f"person_{number}", f"person_{number}_weight", f"person_{number}_region")
    ]


def input_names() -> list[str]:
    """The /generate endpoint's parameters, in order: the prompt, the photos, every other
    declared setting in declaration order, then the LoRA rows; what came later is appended, so
    that the API's earlier parameters keep their positions."""
    from pulid.request import generation_settings

    return (
        ["prompt", "id_image", "extra_images"]
        + [s.name for s in generation_settings() if s.name != "prompt" and s.group != "people"]
        + lora_input_names()
        + ["init_image", "mask"]
        + [s.name for s in generation_settings() if s.group == "people"]
        + ["id_region"]
        + people_input_names()
        + ["mask_drawing", "region_drawing"]
    )


def chosen_people(values: dict, painted: list | None = None) -> tuple[list, object]:
    """Take the people's inputs out of ``values``: person 1's region, and a
    :class:`~pulid.service.PersonUpload` for each other row with photos, in row order. ``painted``
    (each person's region painted in the page, person 1 first) counts as uploaded; a painted and an
    uploaded region for one person, or a region for a row without photos, is refused. Regions count
    with the 'masks' layout only: the page hides them otherwise, so they are left out."""
    from pulid.request import PERSON_WEIGHT
    from pulid.service import PersonUpload, ServiceError

    use_regions = str(values.get("layout") or "").strip().lower() == "masks"
    painted = list(painted or []) + [None] * MAX_PEOPLE

    def region_of(number: int, uploaded):
        if not use_regions:
            return None
        refusal = f"Person {number} has a painted region and an uploaded one: keep one."
        return painted_or_uploaded(painted[number - 1], uploaded, refusal)

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
        people.append(PersonUpload(photos, PERSON_WEIGHT.default if weight is None else weight, region))
    return people, id_region


def painted_or_uploaded(painted, uploaded, refusal: str):
    """What was painted in the page or else what was uploaded; both is refused with ``refusal``."""
    from pulid.service import ServiceError

    if painted is not None and uploaded is not None:
        raise ServiceError(refusal)
    return painted if painted is not None else uploaded


def chosen_loras(values: dict) -> list[tuple[str, object]]:
    """Take the LoRA rows out of ``values``: (name, strength) of each row with a LoRA chosen (a
    missing strength is the declared default)."""
    from pulid.request import LORA_STRENGTH

    chosen = []
    for row in range(1, LORA_ROWS + 1):
        name = values.pop(f"lora_{row}", None)
        strength = values.pop(f"lora_{row}_strength", None)
        if name:
            chosen.append((name, LORA_STRENGTH.default if strength is None else strength))
    return chosen


def with_signature(handler, names: list[str], gr):
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

    from PIL import Image

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


# Run in the page as Generate is pressed, before the request leaves: the status line says so at once
# (the server's first line replaces it). The inputs go on unchanged.
SHOW_SENDING = """(...inputs) => {
  const line = document.querySelector("#result-info .md");
  if (line) line.innerHTML = '<p><progress max="1"></progress> <strong>Sending the request</strong></p>';
  return inputs;
}"""
# Counts the status line's times on in the page (up since the click, down to the end), so that the
# server sends the line only when its stage changes. Gradio draws each new line afresh.
CLOCK_SCRIPT = r"""<style>
#result-info progress { width: 8em; height: 0.8em; vertical-align: middle; accent-color: #f97316; }
</style>
<script>
(() => {
  const shown = (s) => { s = Math.max(0, Math.round(s));
    return s < 60 ? `${s} s` : `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`; };
  setInterval(() => {
    const now = Date.now();
    for (const el of document.querySelectorAll(".job-clock, .job-left")) {
      if (!el.dataset.since) el.dataset.since = now;
      const sent = [...el.classList].find((c) => /^t\d+$/.test(c));
      if (!sent) continue;
      const passed = (now - Number(el.dataset.since)) / 1000;
      if (el.classList.contains("job-clock")) {
        el.textContent = shown(Number(sent.slice(1)) / 10 + passed);
      } else {
        const left = Number(sent.slice(1)) / 10 - passed;
        el.textContent = left >= 1 ? `about ${shown(left)} left` : "almost done";
      }
    }
  }, 250);
})();
</script>"""


def summary(images, cancelled: bool = False, random_models: bool = False) -> str:
    """The text beside the results: one line per image, how to read the face similarity (and that
    random models make it meaningless), what "no ID photo" means, and the LoRAs used (how they
    were applied, and any text-encoder layers that were not)."""
    from pulid.similarity import NO_ID_PHOTO, SCALE

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


def create_demo(args: argparse.Namespace, service):
    """The UI: controls wired to :meth:`pulid.service.GenerationService.start`, nothing else."""
    import gradio as gr
    from gradio import processing_utils
    from gradio.utils import get_upload_folder
    from PIL import Image

    from pulid.catalogue import SPEED_LORAS
    from pulid.regions import PALETTE, painted_regions
    from pulid.request import (
        LORA_STRENGTH,
        PERSON_WEIGHT,
        SIZE_PRESETS,
        generation_settings,
        painted_mask,
        size_for_photo,
    )
    from pulid.service import Cancelled, SavedImage, ServiceError
    from pulid.similarity import NO_ID_PHOTO
    from pulid.uploads import MAX_CANVAS_LAYERS, UploadError, check_upload, painted_layer

    def uploaded(payload) -> None:
        """Refuse, before gradio opens anything, a file input that is not an upload of this app."""
        path = getattr(payload, "path", None)
        if path is None:
            raise refused("Upload the photo itself (links and paths on the server are not read).")
        try:
            check_upload(path, service.upload_roots)
        except UploadError as err:
            raise refused(str(err)) from None

    class UploadedImage(gr.Image):
        """An image input that takes only uploads. It hands on the uploaded file, not pixels: the
        service checks its header at once and decodes it when the job's turn comes, so requests
        waiting in line hold no decoded images."""

        is_template = True  # rendered by the front end's own Image component

        def preprocess(self, payload):
            if payload is None:
                return None
            uploaded(payload)
            return payload.path

    class Painting(gr.ImageEditor):
        """Strokes painted in the page, handed on as ``read(layers)`` of their RGBA layers (the
        subclasses: a mask, or each person's region). Only the painted layers are read (never the
        background, nor a file that was not uploaded), bounded in count, size and pixels. The page
        sends them as uploads with the request; gradio's route for pieces sent ahead
        (``accept_blobs``, which would keep them in memory for anyone) is not offered: it answers
        404."""

        is_template = True

        def get_block_name(self) -> str:  # the front end's own image editor, for the subclasses too
            return "imageeditor"

        def get_block_class(self) -> str:
            return "imageeditor"

        @staticmethod
        def read(layers):
            raise NotImplementedError

        accept_blobs = None  # not a server function: gradio's component route answers 404

        def preprocess(self, payload):
            if payload is None:
                return None
            if payload.id is not None and not payload.layers:
                raise refused(PAINTING_BY_ID)
            try:
                for layer in payload.layers:  # files, which must be uploads of this app
                    uploaded(layer)
                sources = [layer.path for layer in payload.layers[:MAX_CANVAS_LAYERS]]
                layers = [painted_layer(source, "the painting") for source in sources]
            except UploadError as err:
                raise refused(str(err)) from None
            return self.read(layers)

        def example_payload(self):
            return None

        def example_value(self):
            return None

    class MaskPainting(Painting):
        """What to repaint, painted over the photo to start from: a mask, or None."""

        read = staticmethod(painted_mask)

    class RegionPainting(Painting):
        """Where each person stands, painted in the brush colours: a region or None per person."""

        @staticmethod
        def read(layers):
            return painted_regions(layers, MAX_PEOPLE)

    class Photos(gr.File):
        """Extra photos: uploads of this app only (gradio would fetch a URL or read any path)."""

        is_template = True

        def preprocess(self, payload):
            items = payload.root if hasattr(payload, "root") else [payload] if payload is not None else []
            if len(items) > MAX_EXTRA_PHOTOS + 1:  # counted before any is looked at
                raise refused(
                    f"{len(items)} photos were sent for one person; at most {MAX_EXTRA_PHOTOS + 1} "
                    "are used: keep the best."
                )
            for item in items:
                uploaded(item)
            return super().preprocess(payload)

        def example_payload(self):
            return None  # gradio's own example is a remote PDF

        def example_value(self):
            return None

    settings = {s.name: s for s in generation_settings()}
    controls: dict = {}
    brushes = ["#{:02x}{:02x}{:02x}".format(*colour) for colour in PALETTE]
    # A canvas to paint over a background the app sets: one layer, no upload, no crop or resize.
    paint_over = dict(type="numpy", image_mode="RGBA", sources=(), transforms=(), layers=False)
    # removed when the app stops (Ctrl+C or SIGTERM) or the demo is let go
    faces = tempfile.TemporaryDirectory(prefix="pulid-flux-faces-") if args.dev else None

    async def generate(values: dict, request: gr.Request, progress: gr.Progress):
        """:func:`run_request`, with one line in the server's log for each request: who sent it,
        what it asked for, how it ended and after how long."""
        started, ended = time.monotonic(), ["stopped: the visitor cancelled or left"]
        asked = asked_for(values)
        steps = run_request(values, request, progress, ended)
        try:
            async for update in steps:
                yield update
        finally:
            await steps.aclose()  # its own ``finally`` stops the job when the visitor goes
            who = getattr(getattr(request, "client", None), "host", None) or "an unknown address"
            logger.info(
                "request from %s (%s): %s, after %.1f s", who, asked, ended[0], time.monotonic() - started
            )

    async def run_request(values: dict, request, progress, ended: list[str]):
        """Runs the job in the service's worker thread and waits for it without holding a server
        thread. The status line under Generate is sent when what it says changes (the place in
        line, the stage, the step: at most every POLL_SECONDS) and otherwise every
        KEEPALIVE_SECONDS, which is also how soon gradio closes this generator when the visitor
        leaves; the ``finally`` then stops the work or takes the job out of the line. (A message
        every POLL_SECONDS from each of 33 waiting jobs made a full server unresponsive.)
        ``ended[0]`` is set to how the request ended, for the log."""
        photo, extra = values.pop("id_image"), values.pop("extra_images")
        start, mask = values.pop("init_image"), values.pop("mask")
        drawn, painted = values.pop("mask_drawing"), values.pop("region_drawing")
        photos = ([] if photo is None else [photo]) + list(extra or [])
        values["loras"] = chosen_loras(values)
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
            one_mask = painted_or_uploaded(
                drawn, mask, "Give one mask: clear the drawing, or remove the uploaded mask."
            )
            people, id_region = chosen_people(values, painted)
            return service.start(
                service.build_request(None, None, **values),
                _session(request),
                show,
                client=visitor_of(request, args.behind_proxy),
                photos=photos,
                init_image=start,
                mask=one_mask,
                people=people,
                id_region=id_region,
            )

        def status(text: str | None = None):
            """Only the status line (the summary box) changes."""
            return (gr.skip(), status_line(bar) if text is None else text, *(gr.skip(),) * 4)

        _session(request)  # a request without one is refused before anything is said or done
        yield status()  # on the page at once, before the request's files are checked
        admission = asyncio.ensure_future(asyncio.to_thread(admit))
        try:
            job = await asyncio.shield(admission)
        except Cancelled as err:  # by the visitor's Cancel while its files were checked
            ended[0] = "cancelled while it was checked"
            yield status("**Cancelled.**")
            raise refused(str(err)) from None
        except ServiceError as err:
            ended[0] = f"refused ({str(err)[:120]})"
            yield status("")  # no clock ticking on under the refusal's message
            raise refused(str(err)) from None
        except asyncio.CancelledError:  # cancelled or gone while it was checked: its job goes too
            admission.add_done_callback(lambda done: done.exception() or done.result().cancel())
            raise

        def outputs(result=None, cancelled=False):
            images = list(saved)
            files = [on_page(i.path) for i in images]
            finished = result is not None or cancelled
            return (
                list(zip(files, map(caption, images), strict=True)),
                summary(images, cancelled, args.preset == "tiny-random") if finished else status_line(bar),
                files,
                details(images),
                gr.skip()
                if result is None or not args.dev
                else face_files(result.debug_images, Path(faces.name)),
                images,
            )

        shown, said, said_at = 0, None, time.monotonic()
        try:
            while not job.wait(0):
                await asyncio.sleep(POLL_SECONDS)
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
                    raise refused(str(err)) from None
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

    def cancel(request: gr.Request):
        session = getattr(request, "session_hash", None)
        if not session or service.cancel(session) == 0:
            return "Nothing to cancel: no generation of yours is running or waiting."
        return "**Cancelled.** Images finished before the cancel stay above."

    page_copies: collections.OrderedDict[Path, str] = collections.OrderedDict()
    copies_lock = threading.Lock()

    def on_page(path: Path) -> str:
        """A copy of a saved image in gradio's cache, which it hands out as it is. Gradio copies only
        from the working directory and the temp folder, so images in an --outputs_dir elsewhere (a
        Space's /data) were refused; allowing that folder instead would serve all of it to anyone.
        The copy is made once and reused while it lasts (touched, as gradio touches what it hands
        out again), so a batch and the history gallery do not hash every image at each update."""
        with copies_lock:
            copy = page_copies.get(path)
            if copy is not None and os.path.exists(copy):
                page_copies.move_to_end(path)
                with contextlib.suppress(OSError):
                    os.utime(copy)  # gradio's cache cleaner ages files by their time
                return copy
        copy = processing_utils.save_file_to_cache(path, get_upload_folder())
        with copies_lock:
            page_copies[path] = copy
            while len(page_copies) > PAGE_COPIES_KEPT:
                page_copies.popitem(last=False)
        return copy

    def add_to_history(latest, history):
        history = ([*latest, *history] if latest else history)[:HISTORY_SIZE]
        return history, [(on_page(i.path), caption(i)) for i in history]

    def pick(history, event: gr.SelectData):
        image = history[event.index]
        return image.seed, f"Selected: `{image.path.name}`, {caption(image)}", image.metadata

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

    def lora_choices(refresh: bool = False):
        return [NO_LORA, *((name, name) for name in service.lora_names(refresh))]

    def refresh_loras(*current):
        choices = lora_choices(refresh=True)
        known = {value for _, value in choices}
        return [gr.update(choices=choices, value=value if value in known else "") for value in current]

    def speed_preset(name):
        """Put the speed LoRA in the first row at its strength, with its steps and guidance."""
        lora = SPEED_LORAS[name]
        return name, lora.strength, lora.steps, lora.guidance

    with gr.Blocks(title="PuLID for FLUX", delete_cache=UPLOAD_CACHE) as demo:
        gr.Markdown("## PuLID for FLUX · put the face from a photo into new FLUX.1-dev images")
        if args.preset == "tiny-random":
            gr.Markdown(
                "**tiny-random preset: random tiny models on the CPU, so the images are noise.** It is "
                "for trying the page and the API without downloading 38 GB of weights, and starts at "
                f"{TINY_START['width']} x {TINY_START['height']} and {TINY_START['num_steps']} steps "
                "(a few seconds). For real images, get the weights (README, *Weights*) and start "
                "without `--preset`.",
                elem_id="preset-notice",
            )
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=420):
                controls["prompt"] = control(settings["prompt"], gr, lines=2, elem_id="prompt")
                with gr.Row():
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel_button = gr.Button("Cancel", elem_id="cancel")
                # the request's status while it waits and runs (stage, times), then what it made
                info = gr.Markdown(elem_id="result-info")
                with gr.Row(equal_height=False):
                    controls["id_image"] = UploadedImage(
                        label="ID photo", type="filepath", height=230, elem_id="id-image"
                    )
                    with gr.Column(min_width=160):
                        notice = gr.Markdown(
                            f"**{NO_ID_PHOTO}**: the image will be plain FLUX.1-dev. "
                            "Add a photo of a face to put that person in it.",
                            elem_id="no-photo-notice",
                        )
                        controls["extra_images"] = Photos(
                            label=f"More photos of the same person (optional, up to {MAX_EXTRA_PHOTOS})",
                            file_count="multiple",
                            file_types=["image"],
                            type="filepath",
                            height=120,
                        )
                with gr.Row():
                    controls["id_weight"] = control(settings["id_weight"], gr)
                    controls["start_step"] = control(settings["start_step"], gr)
                with gr.Row(equal_height=True):
                    controls["num_images"] = control(settings["num_images"], gr)
                    controls["seed"] = control(settings["seed"], gr, elem_id="seed")
                with gr.Row():
                    randomize = gr.Button("Random seed", size="sm")
                    reuse = gr.Button("Use the selected image's seed", size="sm")
                with gr.Accordion("Start from a photo (image to image)", open=False, elem_id="edit"):
                    gr.Markdown(
                        "The image starts from this photo instead of noise. Choosing it sets the "
                        "size to its shape. Strength 1 ignores it; lower keeps more of it. To "
                        "repaint only part of it, paint over it below, or upload a mask (white "
                        "repaints, black keeps), or choose 'face' to repaint its largest face."
                    )
                    with gr.Row(equal_height=False):
                        controls["init_image"] = UploadedImage(
                            label="Photo to start from", type="filepath", height=200, elem_id="init-image"
                        )
                        controls["mask"] = UploadedImage(
                            label="Mask (optional): white repaints",
                            type="filepath",
                            height=200,
                            elem_id="mask",
                        )
                    controls["mask_drawing"] = MaskPainting(
                        label="Paint what to repaint (optional)",
                        **paint_over,
                        brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                        height=320,
                        elem_id="mask-drawing",
                    )
                    with gr.Row():
                        for name, setting in settings.items():
                            if setting.group == "edit":
                                controls[name] = control(setting, gr)
                with gr.Accordion(f"Several people (up to {MAX_PEOPLE})", open=False, elem_id="people"):
                    gr.Markdown(
                        "The ID photo above is person 1; add the others here, each with their own "
                        "photos and ID weight. With 'columns' they stand side by side in this "
                        "order, left to right; with 'masks' each goes where their region is white "
                        "(regions are drawn over the image, or over the photo to start from). "
                        "Say in the prompt how many people there are."
                    )
                    for name, setting in settings.items():
                        if setting.group == "people":
                            controls[name] = control(setting, gr)
                    masks = settings["layout"].default == "masks"
                    controls["id_region"] = UploadedImage(
                        label="Person 1's region (white: where they stand)",
                        type="filepath",
                        height=140,
                        elem_id="id-region",
                        visible=masks,
                    )
                    for number in range(2, MAX_PEOPLE + 1):
                        with gr.Row(equal_height=False):
                            controls[f"person_{number}"] = Photos(
                                label=f"Person {number}: photos of their face",
                                file_count="multiple",
                                file_types=["image"],
                                type="filepath",
                                height=140,
                                elem_id=f"person-{number}",
                            )
                            with gr.Column(min_width=160):
                                controls[f"person_{number}_weight"] = control(
                                    dataclasses.replace(PERSON_WEIGHT, label=f"Person {number}: ID weight"),
                                    gr,
                                )
                            controls[f"person_{number}_region"] = UploadedImage(
                                label=f"Person {number}'s region",
                                type="filepath",
                                height=140,
                                elem_id=f"person-{number}-region",
                                visible=masks,
                            )
                    controls["region_drawing"] = RegionPainting(
                        value=canvas_background(
                            None, *(settings[side].default for side in ("width", "height"))
                        ),
                        label="Or paint where each stands: red 1, green 2, blue 3, yellow 4",
                        **paint_over,
                        brush=gr.Brush(colors=brushes, default_color=brushes[0], color_mode="fixed"),
                        height=360,
                        elem_id="region-drawing",
                        visible=masks,
                    )
                with gr.Accordion("LoRA: styles, subjects, 8-step speed", open=False, elem_id="loras"):
                    choices = lora_choices()  # the folder is listed once for all rows
                    offered = {value for _, value in choices}
                    gr.Markdown(
                        "LoRA files in `models/loras/` are listed here. A speed preset puts an 8-step "
                        "LoRA in the first row and sets its steps and guidance. Speed LoRAs that this "
                        "server has, or can download, are offered."
                    )
                    with gr.Row():
                        speed_buttons = {
                            name: gr.Button(f"{name}: {lora.steps} steps", size="sm")
                            for name, lora in SPEED_LORAS.items()
                            if name in offered
                        }
                    for row in range(1, LORA_ROWS + 1):
                        with gr.Row(equal_height=True):
                            controls[f"lora_{row}"] = listed_choice_class(gr)(
                                choices,
                                value="",
                                label=f"LoRA {row}",
                                scale=3,
                                elem_id=f"lora-{row}",
                            )
                            controls[f"lora_{row}_strength"] = control(LORA_STRENGTH, gr, scale=2)
                    refresh = gr.Button("Refresh the list", size="sm")
            with gr.Column(scale=6, min_width=420):
                results = gr.Gallery(
                    label="Results",
                    columns=2,
                    height=430,
                    object_fit="contain",
                    elem_id="results",
                    format="png",
                )
                # right under the results, where a user looks to change what comes out next
                with gr.Accordion("Size, steps and guidance", open=True, elem_id="size"):
                    preset = listed_choice_class(gr)(
                        ["custom", *SIZE_PRESETS],
                        value=next(iter(SIZE_PRESETS)),
                        label="Size preset",
                        info="Sets width and height; pick 'custom' to use the sliders alone.",
                    )
                    for name, setting in settings.items():
                        if setting.group == "image":
                            controls[name] = control(setting, gr)
                files = gr.File(label="Files (with prompt and settings inside)", file_count="multiple")
                debug_gallery = gr.Gallery(label="Detected, aligned and parsed face", visible=args.dev)
        with gr.Row(equal_height=False):
            with gr.Column(), gr.Accordion("Advanced: T5 length, true CFG", open=False):
                gr.Markdown(tips())
                for name, setting in settings.items():
                    if setting.group in ("advanced", "dev"):
                        controls[name] = control(setting, gr, setting.group != "dev" or args.dev)
            with gr.Column(), gr.Accordion("Output format", open=False):
                for name, setting in settings.items():
                    if setting.group == "output":
                        controls[name] = control(setting, gr)
        with gr.Accordion("This session's images (select one to see its settings)", open=False):
            history_gallery = gr.Gallery(columns=6, height=300, object_fit="contain", elem_id="history")
            picked = gr.Markdown()
            picked_settings = gr.JSON(label="Settings of the selected image")
            picked_seed = gr.State(None)
        result_details = gr.JSON(label="Result details", visible=False)
        latest = gr.State([])
        history = gr.State([])
        if EXAMPLE_PHOTO.is_file():
            example_inputs = ["prompt", "id_image", "start_step", "guidance", "seed"]
            gr.Examples(
                [[prompt, str(EXAMPLE_PHOTO), *rest] for prompt, *rest in EXAMPLES],
                inputs=[controls[name] for name in example_inputs],
                label="Examples (photoreal prompts start the ID at step 4, stylised ones at 0-1)",
            )
        names = input_names()
        missing = set(names) ^ set(controls)
        if missing:
            raise RuntimeError(f"the UI and the declared settings disagree on: {sorted(missing)}")
        event = generate_button.click(
            with_signature(generate, names, gr),
            inputs=[controls[name] for name in names],
            outputs=[results, info, files, result_details, debug_gallery, latest],
            api_name="generate",
            js=SHOW_SENDING,
            show_progress="hidden",  # the status line under Generate says it, and stays on screen
            # Every admitted request enters its handler at once and waits in the service's line,
            # which bounds each visitor's share; gradio's own queue only holds the overflow.
            concurrency_limit=MAX_QUEUED + 1,
        )
        event.success(add_to_history, [latest, history], [history, history_gallery], api_visibility="private")
        cancel_button.click(cancel, None, info, cancels=[event], api_name="cancel", queue=False)
        randomize.click(lambda: "-1", None, controls["seed"], api_visibility="private")
        reuse.click(
            lambda seed, current: current if seed is None else str(seed),
            [picked_seed, controls["seed"]],
            controls["seed"],
            api_visibility="private",
        )
        shown_pick = [picked_seed, picked, picked_settings]
        history_gallery.select(pick, history, shown_pick, api_visibility="private")
        results.select(pick, latest, shown_pick, api_visibility="private")
        if args.preset == "tiny-random":  # the page starts small; the API's defaults stay the declared ones
            starting = [controls[name] for name in TINY_START] + [preset]
            demo.load(lambda: (*TINY_START.values(), "custom"), None, starting, api_visibility="private")
        preset.change(size_of, preset, [controls["width"], controls["height"]], api_visibility="private")
        for side in ("width", "height"):  # a size set by hand is no longer the preset's
            controls[side].input(lambda: "custom", None, preset, api_visibility="private")
        controls["id_image"].change(photo_notice, controls["id_image"], notice, api_visibility="private")
        controls["init_image"].change(
            lambda path: path, controls["init_image"], controls["mask_drawing"], api_visibility="private"
        )
        controls["init_image"].upload(
            match_photo,
            [controls["init_image"], controls["width"], controls["height"]],
            [controls["width"], controls["height"], preset],
            api_visibility="private",
        )
        region_inputs = [controls["id_region"], controls["region_drawing"]] + [
            controls[f"person_{number}_region"] for number in range(2, MAX_PEOPLE + 1)
        ]
        canvas_inputs = [controls["init_image"], controls["width"], controls["height"]]
        for source in canvas_inputs:  # the regions are painted over the photo, or the image's shape
            source.change(
                canvas_background, canvas_inputs, controls["region_drawing"], api_visibility="private"
            )
        controls["layout"].change(  # the regions matter with 'masks' only
            lambda layout: [gr.update(visible=layout == "masks")] * len(region_inputs),
            controls["layout"],
            region_inputs,
            api_visibility="private",
        )
        lora_pickers = [controls[f"lora_{row}"] for row in range(1, LORA_ROWS + 1)]
        refresh.click(refresh_loras, lora_pickers, lora_pickers, api_visibility="private")
        for name, button in speed_buttons.items():
            button.click(
                lambda name=name: speed_preset(name),
                None,
                [
                    controls["lora_1"],
                    controls["lora_1_strength"],
                    controls["num_steps"],
                    controls["guidance"],
                ],
                api_visibility="private",
            )
    return demo.queue(default_concurrency_limit=1, max_size=MAX_QUEUED)


def make_service(pipeline, output_dir=None, keep_outputs: int = 0, runner=None):
    """The service under the app: file inputs are read only from gradio's upload folder, the
    line for the GPU is bounded, per visitor too, and the outputs folder keeps ``keep_outputs``
    images (0: all). ``runner``: where the GPU work runs (default: in this process)."""
    from gradio.utils import get_upload_folder

    from pulid.service import GenerationService

    return GenerationService(
        pipeline,
        output_dir,
        upload_roots=[get_upload_folder()],
        listed_loras_only=True,
        max_waiting=MAX_QUEUED,
        max_per_client=MAX_QUEUED_PER_VISITOR,
        keep_outputs=keep_outputs,
        runner=runner,
    )


def launch(demo, args: argparse.Namespace, **options) -> None:
    """Serve ``demo`` with the app's limits and its host-name check (:mod:`pulid.web_guard`)."""
    from gradio.utils import get_upload_folder
    from starlette.middleware import Middleware

    from pulid.web_guard import BodyLimit, HostCheck, PayloadCheck, UploadQuota, allowed_hosts

    hosts = allowed_hosts(args.host, args.share, IN_SPACE, args.allowed_hosts)
    logger.info("answering to host names: %s", ", ".join(hosts))
    if not args.behind_proxy:  # uvicorn would take X-Forwarded-For from any local peer as the client
        os.environ.setdefault("FORWARDED_ALLOW_IPS", "")
    options = {"server_name": args.host, "server_port": args.port, "share": args.share, **options}
    middleware = [
        Middleware(HostCheck, patterns=hosts),
        Middleware(BodyLimit, default=MAX_JSON_BODY_BYTES, by_route=BODY_LIMITS),
        Middleware(
            UploadQuota,
            folder=get_upload_folder(),
            min_free=MIN_FREE_DISK_BYTES,
            per_visitor=MAX_UPLOAD_BYTES_PER_HOUR,
            largest=BODY_LIMITS["/gradio_api/upload"],
            behind_proxy=args.behind_proxy,
        ),
        Middleware(PayloadCheck, events=event_inputs(demo), upload_folder=get_upload_folder()),
    ]
    held = options.pop("prevent_thread_lock", False)  # tests serve from a thread and go on
    options.pop("quiet", None)  # always quiet: the app says where it serves
    try:
        demo.launch(
            head=CLOCK_SCRIPT,
            # in bytes: gradio's "20mb" would be 20 MiB, not the service's limit
            max_file_size=MAX_UPLOAD_BYTES,
            app_kwargs={"middleware": middleware},
            prevent_thread_lock=True,
            quiet=True,  # its hint to set share=True in launch() is not this app's flag; said below
            **options,
        )
    except OSError as err:  # the port was free at the start check, and taken while the models loaded
        raise SystemExit(
            f"\nCannot start: port {options['server_port']} on {options['server_name']} was taken while "
            f"the models loaded ({err.strerror or 'in use'}): stop what listens there, or pass --port "
            "with another.\n"
        ) from None
    public = f", and at {demo.share_url}" if demo.share_url else " (--share makes a public link)"
    print(f"Serving at {demo.local_url}{public}. Ctrl+C stops it.", flush=True)
    if not held:
        serve_until_stopped(demo)


def serve_until_stopped(demo, close_seconds: float = STOP_SECONDS) -> None:
    """Wait for Ctrl+C or SIGTERM, then close the server, giving it ``close_seconds`` at most:
    gradio's own wait closed open streams one by one and took 8-22 s. Raises KeyboardInterrupt,
    which the entry point turns into one line."""
    import io

    def close() -> None:
        with contextlib.redirect_stdout(io.StringIO()):  # gradio's "Closing server running on port"
            demo.close()

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        closing = threading.Thread(target=close, name="closing", daemon=True)
        closing.start()
        closing.join(close_seconds)
        raise


def event_inputs(demo):
    """For :class:`pulid.web_guard.PayloadCheck`: the input names of the event a request names (by
    ``fn_index`` or API name), in the order the payload sends them; None for one it does not name."""

    def names(route) -> list[str] | None:
        for fn in demo.fns.values():
            if route not in (fn._id, fn.api_name) or isinstance(route, bool):
                continue
            count = len(fn.inputs)
            parameters = list(inspect.signature(fn.fn).parameters) if fn.fn is not None else []
            if len(parameters) >= count:  # the inputs come first, then gr.Request and the like
                return parameters[:count]
            return [getattr(block, "label", None) or f"input {i + 1}" for i, block in enumerate(fn.inputs)]
        return None

    return names


def problems_before_loading(args: argparse.Namespace) -> list[str]:
    """What would stop the app only after its models loaded: the address to serve on, the outputs
    folder, Ray for ``--ray``. Found in a second instead of after minutes of loading."""
    from pulid.outputs import writable_folder_problem

    problems = []
    ports = [("--port", args.port)] + ([("--ray_http_port", args.ray_http_port)] if args.ray else [])
    for flag, port in ports:
        if (problem := address_problem(args.host, port, flag)) and problem not in problems:
            problems.append(problem)
    if problem := writable_folder_problem(args.outputs_dir, "--outputs_dir"):
        problems.append(problem)
    if args.ray:
        try:
            import ray  # noqa: F401
            from ray import serve  # noqa: F401
        except ImportError:
            problems.append("--ray needs Ray Serve, an optional extra: pip install -r requirements-serve.txt")
    return problems


def address_problem(host: str, port: int, flag: str) -> str | None:
    """Whether ``host``:``port`` can be listened on (bound and released at once, as the server will)."""
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError):
        return f"--host {host!r} is not a name or address this machine can serve on."
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return (
                    f"port {port} on {host} is in use: stop what listens there, or pass {flag} with another."
                )
            if err.errno == errno.EADDRNOTAVAIL:
                return f"--host {host} is not an address of this machine: use 127.0.0.1, or 0.0.0.0 for all."
            return f"cannot listen on {host}:{port} ({err.strerror or err}): check --host and {flag}."
    return None


def refused(message: str):
    """The error a visitor sees for a request that cannot be served as sent: one log line on the
    server, not gradio's traceback (an ordinary user mistake is not a crash)."""
    import gradio as gr

    logger.info("refused a request: %s", message[:300])
    return gr.Error(message, print_exception=False, duration=None)  # stays until the visitor closes it


def visitor_of(request, behind_proxy: bool) -> str:
    """Who sent the request (:func:`pulid.web_guard.visitor`): their share of the line counts by it."""
    from pulid.web_guard import visitor

    client = getattr(request, "client", None)
    headers = getattr(request, "headers", None) or {}
    forwarded = headers.get("x-forwarded-for")
    return visitor(getattr(client, "host", None), forwarded, behind_proxy, _session(request))


NO_SESSION = (
    "This request came without a session, so it could not be cancelled or counted as yours: use the "
    "page, or gradio_client (which opens one)."
)


def _session(request) -> str:
    """The caller's session: cancel flags are kept per session, so a visitor stops only their own
    job. A request without one (a raw POST to a ``/run`` route) is refused with a message."""
    session = getattr(request, "session_hash", None)
    if not session:
        raise refused(NO_SESSION)
    return session


def configure_space() -> None:
    """On a Hugging Face Space: keep downloads on the persistent disk when there is one, unless
    the build already put the weights in the default cache (README's ``preload_from_hub``)."""
    if IN_SPACE and Path("/data").is_dir() and "HF_HOME" not in os.environ and not preloaded():
        os.environ["HF_HOME"] = "/data/.huggingface"
        logger.info("Space with persistent storage: caching weights in %s", os.environ["HF_HOME"])


def preloaded() -> bool:
    """Whether the default flags' FLUX.1-dev transformer is already on this machine (the Space's
    build put it in the default Hugging Face cache), as the loader will look for it."""
    from flux.hub import find_local
    from pulid.catalogue import DEFAULT_MODEL, DEFAULT_VERSION, default_models_dir, required_weights

    flow = required_weights(DEFAULT_MODEL, DEFAULT_VERSION, None, {})["flow"]
    return find_local(flow.weights, default_models_dir()) is not None


def stop_on_sigterm() -> None:
    """SIGTERM (``docker stop``, systemd, ``kill``) stops the app as Ctrl+C does: the server closes
    and temporary folders go, where the default would end the process at once."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> None:
    if argv is None:  # a Space cannot pass flags: PULID_FLUX_ARGS="--offload --fp8" does it instead
        argv = sys.argv[1:] + shlex.split(os.environ.get("PULID_FLUX_ARGS", ""))
    args = parse_args(argv)  # before torch is imported: --help and a mistyped flag answer at once
    # Then: on ZeroGPU, importing ``spaces`` patches torch before anything starts CUDA.
    from pulid.zerogpu import ON_ZERO_GPU, ZeroGPURunner, check_flags

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests, one line each
    # Before CUDA starts: keeps the allocator's reserved memory near what is in use, which the
    # memory budgets count on (measured in BENCHMARKS.md).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    configure_space()
    stop_on_sigterm()
    if problems := problems_before_loading(args):
        raise SystemExit("\nCannot start:\n- " + "\n- ".join(problems) + "\n")
    ahead_of_time = False
    if ON_ZERO_GPU:
        if problems := check_flags(args):
            raise SystemExit("\nCannot start on ZeroGPU:\n- " + "\n- ".join(problems) + "\n")
        args.onnx_provider = "cpu"  # the app process has no GPU; the face stage is small (BENCHMARKS.md)
        ahead_of_time, args.compile = args.compile, False  # compiled ahead of time below, not at load
    runner = None
    if args.ray:  # the pipelines live in Ray Serve replicas; this process serves the page
        from flux.devices import HardwareError
        from pulid.ray_serve import RayRunner, start
        from pulid.web_guard import allowed_hosts

        try:
            check_whole_pipeline_per_gpu(args, "--ray")
        except HardwareError as err:
            raise SystemExit(f"\nCannot start: {err}\n") from None
        handle = start(
            argv,
            args.replicas,
            on_gpus=args.preset is None,
            address=args.ray_address,
            http_host=args.host,
            http_port=args.ray_http_port,
            hosts=allowed_hosts(args.host, args.share, IN_SPACE, args.allowed_hosts),
        )
        service = make_service(None, args.outputs_dir, args.keep_outputs, RayRunner(handle, args.replicas))
        launch(create_demo(args, service), args)
        return
    if args.replicas > 1:  # one pipeline per GPU, a job on each at once
        from pulid.service import ReplicaRunner

        pipelines = load_or_exit(args, args.replicas)
        pipeline, runner = pipelines[0], ReplicaRunner(pipelines)
    else:  # on ZeroGPU: placed on cuda now, moved into each GPU worker by spaces
        pipeline = load_or_exit(args)
    if ON_ZERO_GPU:
        if ahead_of_time:
            from pulid.uploads import load_upload
            from pulid.zerogpu import prepare_ahead_of_time

            prepare_ahead_of_time(pipeline, load_upload(EXAMPLE_PHOTO))
        runner = ZeroGPURunner(pipeline)
    if args.sequence_parallel:  # torchrun: rank 0 serves and shares each request with the others
        from pulid.ranks import SequenceParallelRunner, follow, leads, leave_group

        if not leads():
            follow(pipeline)
            leave_group()
            return
        runner = SequenceParallelRunner(pipeline)
    demo = create_demo(args, make_service(pipeline, args.outputs_dir, args.keep_outputs, runner))
    try:
        launch(demo, args)
    finally:
        if args.sequence_parallel:
            runner.close()
            leave_group()


def exit_now(code: int) -> None:
    """End the process once its exit hooks have run (the temporary folders go), without waiting
    for the libraries' threads and pools to wind down, which took seconds after a SIGTERM."""
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl+C or SIGTERM, while loading or serving: one line, no traceback
        print("\nStopped.", file=sys.stderr)
        exit_now(130)
