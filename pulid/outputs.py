"""Writing generated images with the settings that made them, and keeping the outputs folder bounded.

Every image carries its prompt, seed and settings twice over:

* as JSON (``pulid_flux``), for tools and for :func:`read_image_metadata`, which gives back the
  settings dict exactly;
* as the text that AUTOMATIC1111 writes (``parameters``: the prompt, ``Negative prompt: ...``, then
  ``Steps: 28, Sampler: Euler, ...``), which PNG-info readers (A1111, Forge, Civitai, ComfyUI
  loaders) show and parse.

PNG keeps both as text chunks, and only those two (plus ``Software``): ComfyUI loads a PNG's
``workflow`` or ``prompt`` chunk as its own graph before it looks at ``parameters``, so a chunk
named after a setting would hand a visitor's prompt to whoever drops the image into ComfyUI. JPEG
and WebP keep the A1111 text in EXIF ``UserComment`` (where A1111 puts it) and the JSON in EXIF
``ImageDescription``.

The A1111 text is one line per part, and A1111 reads any line that starts with ``Negative prompt:``
as the negative prompt, so the prompts are written on one line each (line breaks become spaces;
the JSON keeps them exactly) and a prompt that would itself read as a negative prompt is quoted.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from pathlib import Path

from PIL import ExifTags, Image
from PIL.PngImagePlugin import PngInfo

from flux.conventions import uses_true_cfg

SOFTWARE = "PuLID-FLUX studio"
JSON_KEY = "pulid_flux"
A1111_KEY = "parameters"
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}  # output format -> file suffix
_FORMAT_OF = {suffix: fmt for fmt, suffix in EXTENSIONS.items()}
_NAME = re.compile(  # what output_name makes
    r"^\d{8}-\d{6}-\d{4}-seed\d+-.*(" + "|".join(re.escape(s) for s in EXTENSIONS.values()) + ")$"
)
_USER_COMMENT_UNICODE = b"UNICODE\0"  # EXIF's character-code prefix; the text follows in UTF-16 BE


def writable_folder_problem(folder: str | os.PathLike, flag: str) -> str | None:
    """Make ``folder`` (and its parents) and check that a file can be written in it; what is wrong
    otherwise, naming ``flag``. Checked at start, so no generation runs only to fail at saving."""
    import tempfile

    if Path(folder).exists() and not Path(folder).is_dir():
        return f"{flag} {folder} is a file: give a folder for the images."
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as err:
        return (
            f"{flag} {folder} cannot hold the images ({err.strerror or err}): give a folder you can write to."
        )
    return None


def a1111_parameters(metadata: dict) -> str:
    """The settings in AUTOMATIC1111's ``parameters`` format (values with ``,:"`` are quoted)."""
    loras = metadata.get("loras") or []
    # A1111 writes each LoRA into the prompt as <lora:name:strength> and lists their hashes.
    tags = "".join(f" <lora:{_one_line(lora['name'])}:{lora['strength']:g}>" for lora in loras)
    prompt = _one_line(metadata.get("prompt", ""))
    if prompt.startswith(_NEGATIVE):  # A1111 would read the whole prompt as the negative one
        prompt = json.dumps(prompt, ensure_ascii=False)
    lines = [prompt + tags]
    true_cfg = float(metadata.get("true_cfg", 1.0))
    if metadata.get("neg_prompt") and uses_true_cfg(true_cfg):  # read only with true CFG
        lines.append(f"{_NEGATIVE} {_one_line(metadata['neg_prompt'])}")
    fields = {
        "Steps": metadata.get("num_steps"),
        "Sampler": "Euler",
        "Schedule type": "Simple",  # FLUX's shifted schedule, as Forge names it for FLUX
        "CFG scale": true_cfg,
        "Distilled CFG Scale": metadata.get("guidance"),
        "Seed": metadata.get("seed"),
        "Size": f"{metadata.get('width')}x{metadata.get('height')}",
        "Model": metadata.get("model"),
        "PuLID": metadata.get("pulid_version"),
        "PuLID weight": metadata.get("id_weight"),
        "PuLID start step": metadata.get("start_step"),
        "PuLID photos": metadata.get("num_id_images"),
        "Face similarity": metadata.get("face_similarity"),
        "T5 length": metadata.get("max_sequence_length"),
        "Lora hashes": ", ".join(f"{lora['name']}: {lora['sha256']}" for lora in loras) or None,
        "Version": SOFTWARE,
    }
    given = {key: value for key, value in fields.items() if value is not None}
    lines.append(", ".join(f"{key}: {_a1111_value(value)}" for key, value in given.items()))
    return "\n".join(lines)


_NEGATIVE = "Negative prompt:"
_LINE_BREAKS = re.compile(r"\s*[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]+\s*")


def _one_line(text) -> str:
    """``text`` with every line break (and the blanks around it) as one space, stripped."""
    return _LINE_BREAKS.sub(" ", str(text)).strip()


def _a1111_value(value) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return json.dumps(text) if any(c in text for c in ',:"\n') else text


def save_image(image: Image.Image, metadata: dict, path: str | os.PathLike, quality: int = 95) -> Path:
    """Write ``image`` with ``metadata`` in the format of ``path``'s extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = json.dumps(metadata, sort_keys=True, default=str)
    text = a1111_parameters(metadata)
    if path.suffix == ".png":
        info = PngInfo()
        info.add_text(A1111_KEY, text)
        info.add_text(JSON_KEY, settings)
        info.add_text("Software", SOFTWARE)
        image.save(path, format="PNG", pnginfo=info)
        return path
    exif = Image.Exif()
    exif[ExifTags.Base.Software] = SOFTWARE
    exif[ExifTags.Base.ImageDescription] = settings  # JSON escapes every non-ASCII character
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = _USER_COMMENT_UNICODE + text.encode(
        "utf-16-be"
    )
    image.save(path, format=_FORMAT_OF[path.suffix].upper(), quality=int(quality), exif=exif.tobytes())
    return path


def read_image_metadata(path: str | os.PathLike) -> dict:
    """The settings dict an image was saved with (PNG, JPEG or WebP written by :func:`save_image`);
    ``ValueError`` for an image without them."""
    with Image.open(path) as image:
        try:
            if image.format == "PNG":
                return json.loads(image.text[JSON_KEY])
            return json.loads(image.getexif()[ExifTags.Base.ImageDescription])
        except (KeyError, AttributeError, ValueError):
            raise ValueError(
                f"{Path(path).name} holds no PuLID-FLUX settings: it was not saved by this app, the CLI "
                "or pulid.outputs.save_image (or they were stripped)."
            ) from None


def read_a1111_parameters(path: str | os.PathLike) -> str:
    """The A1111 ``parameters`` text of an image, from where A1111 itself reads it."""
    with Image.open(path) as image:
        if image.format == "PNG":
            return image.text[A1111_KEY]
        comment = image.getexif().get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment]
        if comment.startswith(_USER_COMMENT_UNICODE):
            return comment[len(_USER_COMMENT_UNICODE) :].decode("utf-16-be")
        return comment.decode("utf-8", "replace")


def output_name(metadata: dict, index: int = 0, when: datetime | None = None, fmt: str = "png") -> str:
    """A unique, sortable file name: date and time, a counter, the seed and the start of the prompt,
    safe on every file system (``20261129-201530-0003-seed42-portrait-color.png``)."""
    when = when or datetime.now()
    words = re.sub(r"[^A-Za-z0-9]+", "-", str(metadata.get("prompt", ""))).strip("-")[:40] or "image"
    return f"{when:%Y%m%d-%H%M%S}-{index:04d}-seed{metadata.get('seed', 'x')}-{words}{EXTENSIONS[fmt]}"


def save_new_image(
    image: Image.Image,
    metadata: dict,
    folder: str | os.PathLike,
    index: int = 0,
    fmt: str = "png",
    quality: int = 95,
) -> Path:
    """Save under :func:`output_name` in ``folder`` without ever replacing an existing file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = output_name(metadata, index, fmt=fmt)
    path, copy = folder / name, 1
    while True:
        try:
            with open(path, "xb"):  # claims the name atomically: two savers never share one
                break
        except FileExistsError:
            stem, suffix = Path(name).stem, Path(name).suffix
            path, copy = folder / f"{stem}-{copy}{suffix}", copy + 1
    try:
        return save_image(image, metadata, path, quality)
    except BaseException:  # a full disk, a stop: no empty or half-written file keeps the name
        path.unlink(missing_ok=True)
        raise


def prune_outputs(folder: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` images this app wrote to ``folder`` (names sort by time);
    other files are never touched. ``keep`` 0 keeps everything. Returns what was deleted."""
    if keep <= 0:
        return []
    folder = Path(folder)
    if not folder.is_dir():
        return []
    ours = sorted(p for p in folder.iterdir() if p.is_file() and _NAME.match(p.name))
    doomed = ours[: max(len(ours) - keep, 0)]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed
