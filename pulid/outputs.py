"""Writing generated images with the settings that made them.

The PNG carries the prompt, seed and every setting as text chunks: ``parameters`` (JSON, for
tools) and one chunk per setting (readable in any PNG viewer), so an image can be reproduced
from the file alone.
"""

from __future__ import annotations

import json
import os
import re
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


def output_name(metadata: dict, index: int = 0) -> str:
    """A file name from the seed and the start of the prompt, safe on every file system."""
    words = re.sub(r"[^A-Za-z0-9]+", "-", str(metadata.get("prompt", ""))).strip("-")[:40] or "image"
    return f"{index:04d}-seed{metadata.get('seed', 'x')}-{words}.png"
