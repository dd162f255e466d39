"""Writing generated images with the settings that made them.

The PNG carries the prompt, seed and every setting as text chunks: ``parameters`` (JSON, for
tools) and one chunk per setting (readable in any PNG viewer), so an image can be reproduced
from the file alone.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

SOFTWARE = "PuLID-FLUX studio"


def save_png(image: Image.Image, metadata: dict, path: str | os.PathLike) -> Path:
    info = PngInfo()
    info.add_text("parameters", json.dumps(metadata, sort_keys=True, default=str))
    info.add_text("Software", SOFTWARE)
    for key, value in metadata.items():
        info.add_text(str(key), str(value))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_png_metadata(path: str | os.PathLike) -> dict:
    with Image.open(path) as image:
        return json.loads(image.text["parameters"])


def output_name(metadata: dict, index: int = 0, when: datetime | None = None) -> str:
    """A unique, sortable file name: date and time, a counter, the seed and the start of the prompt,
    safe on every file system (``20261129-201530-0003-seed42-portrait-color.png``)."""
    when = when or datetime.now()
    words = re.sub(r"[^A-Za-z0-9]+", "-", str(metadata.get("prompt", ""))).strip("-")[:40] or "image"
    return f"{when:%Y%m%d-%H%M%S}-{index:04d}-seed{metadata.get('seed', 'x')}-{words}.png"


def save_new_png(image: Image.Image, metadata: dict, folder: str | os.PathLike, index: int = 0) -> Path:
    """Save under :func:`output_name` in ``folder`` without ever replacing an existing file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = output_name(metadata, index)
    path, copy = folder / name, 1
    while True:
        try:
            with open(path, "xb"):  # claims the name atomically: two savers never share one
                break
        except FileExistsError:
            path, copy = folder / f"{Path(name).stem}-{copy}.png", copy + 1
    return save_png(image, metadata, path)
