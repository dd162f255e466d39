"""Files of every awkward kind a public demo receives, written on demand for the tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skimage_data


def astronaut() -> Image.Image:
    return Image.fromarray(skimage_data.astronaut())


def png_header_only(width: int, height: int) -> bytes:
    """A small PNG whose header declares ``width`` x ``height`` pixels (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def write_bad_inputs(folder: Path) -> dict[str, Path]:
    """name -> file. Images that hold the (stand-in detectable) astronaut unless the name says not."""
    folder.mkdir(parents=True, exist_ok=True)
    face = astronaut()
    files: dict[str, Path] = {}

    def save(name: str, image: Image.Image, **kw) -> None:
        files[name] = folder / name
        image.save(files[name], **kw)

    save("tiny_32px.png", face.resize((32, 32)))
    save("large_7000px.jpg", face.resize((7000, 7000), Image.NEAREST), quality=60)  # 49 MP: accepted
    save("huge_8000px.jpg", face.resize((8000, 8000), Image.NEAREST), quality=60)  # 64 MP: over the limit
    files["bomb.png"] = folder / "bomb.png"
    files["bomb.png"].write_bytes(png_header_only(100_000, 100_000))
    save("grey.png", face.convert("L"))
    save("rgba.png", face.convert("RGBA"))
    sixteen = np.asarray(face.convert("L")).astype(np.uint16) * 257
    save("grey16.png", Image.fromarray(sixteen))
    save("cmyk.jpg", face.convert("CMYK"))
    rotated = face.rotate(90, expand=True)  # stored sideways; EXIF says turn it back upright
    exif = rotated.getexif()
    exif[0x0112] = 6
    save("exif_rotated.jpg", rotated, exif=exif)
    frames = [face, face.transpose(Image.FLIP_LEFT_RIGHT)]
    save("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=100, loop=0)
    save("animated.webp", frames[0], save_all=True, append_images=frames[1:], duration=100, loop=0)
    save("no_face.png", Image.new("RGB", (400, 300), (128, 128, 128)))
    buffer = io.BytesIO()
    face.save(buffer, format="JPEG")
    files["truncated.jpg"] = folder / "truncated.jpg"
    files["truncated.jpg"].write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
    files["text.png"] = folder / "text.png"
    files["text.png"].write_text("this is not an image")
    return files


# What each file must give: "ok" (an image comes back) or a phrase of the user-facing message.
EXPECTED = {
    "tiny_32px.png": ("ok", "No face found", "too small"),
    "large_7000px.jpg": ("ok",),
    "huge_8000px.jpg": ("8000 x 8000 pixels; photos may have at most 50 megapixels",),
    "bomb.png": ("100000 x 100000 pixels", "far more than 50 megapixels"),
    "grey.png": ("ok",),
    "rgba.png": ("ok",),
    "grey16.png": ("ok",),
    "cmyk.jpg": ("ok",),
    "exif_rotated.jpg": ("ok",),
    "animated.gif": ("ok",),
    "animated.webp": ("ok",),
    "no_face.png": ("No face found in the ID image",),
    "truncated.jpg": ("ok", "Could not read the image"),
    "text.png": ("Could not read the image",),
}
