"""Photos in: image files and bytes decoded to RGB arrays, within limits a server can take.

A small file can declare a huge image (a 200 KB PNG that decodes to gigabytes), so every image is
opened lazily and its header checked against :data:`~pulid.limits.MAX_IMAGE_PIXELS` before any
pixel is decoded; every photo comes out upright (EXIF) as RGB uint8. Where the bytes came from (an
upload, a path on the command line, an HTTP body) is for the front doors to check
(:mod:`pulid.serve.uploads`). Failures raise :class:`ImageError` with a message for the user.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pulid.errors import PuLIDError
from pulid.limits import MAX_IMAGE_PIXELS, MAX_UPLOAD_BYTES

UNREADABLE_IMAGE = "Could not read {name}: upload a JPEG, PNG or WebP photo."


class ImageError(PuLIDError, ValueError):
    """An image cannot be used; the message says why and what to send instead."""


def check_file(path: str | os.PathLike) -> Path:
    """``path`` resolved, if it is a regular file of at most :data:`MAX_UPLOAD_BYTES` (a FIFO or a
    device would block whoever opens it)."""
    name = Path(str(path)).name or str(path)
    resolved = Path(path).resolve()
    try:
        info = resolved.stat()
    except OSError:
        raise ImageError(f"{name[:60]} does not exist.") from None
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(f"{name[:60]} is not a regular file: upload a JPEG, PNG or WebP photo.")
    check_size(name, info.st_size)
    return resolved


def check_size(name: str, size: int) -> None:
    """A file of ``size`` bytes is within the upload limit, else :class:`ImageError` saying by how much."""
    if size > MAX_UPLOAD_BYTES:
        raise ImageError(
            f"{name[:60]} is {size:,} bytes, larger than the {MAX_UPLOAD_BYTES:,} bytes "
            f"({MAX_UPLOAD_BYTES / 1e6:.0f} MB) a file may be: send a smaller copy."
        )


def check_pixels(width: int, height: int, name: str) -> None:
    """Refuse an image whose header declares more than :data:`MAX_IMAGE_PIXELS`."""
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"{name[:60]} is {width} x {height} pixels; photos may have at most "
            f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels: send a smaller copy."
        )


@contextlib.contextmanager
def open_checked(path: str | os.PathLike, name: str) -> Iterator:
    """The image opened lazily (header only), its size checked against the pixel limit; decoding
    inside the block happens only for an image within the limit."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            check_pixels(*image.size, name)
            yield image
    except ImageError:
        raise
    except Image.DecompressionBombError:  # PIL's own guard, far above ours
        raise ImageError(
            f"{name[:60]} has far more than {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels: send a smaller copy."
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ImageError(UNREADABLE_IMAGE.format(name=name)) from err


def check_header(path: str | os.PathLike, name: str) -> tuple[int, int]:
    """(width, height) from the image header, checked against the pixel limit; nothing is decoded."""
    with open_checked(path, name) as image:
        return image.size


def load_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as RGB uint8, rotated as its EXIF says (first frame of animations), checked
    with :func:`check_file` and, from its header, against the pixel limit before decoding."""
    resolved = check_file(path)
    with open_checked(resolved, f"the image {resolved.name}") as image:
        return upright_rgb8(image)


def load_mask_image(path: str | os.PathLike) -> np.ndarray:
    """A mask or region file as (H, W) uint8, checked as :func:`load_image` checks a photo: its
    alpha where it has transparency (strokes on a transparent layer: a transparent white is not
    painted), else its brightest channel (white or any colour on black)."""
    resolved = check_file(path)
    with open_checked(resolved, f"the image {resolved.name}") as image:
        image = upright(image)
        if has_alpha(image):
            alpha = np.asarray(image.convert("RGBA"))[..., 3]
            if alpha.min() < 255:
                return alpha.copy()
        return rgb8(image).max(axis=2)


@dataclass(frozen=True)
class ImageFile:
    """An image that a request names by its file. :meth:`check` reads its header only (a regular
    file, within the size and pixel limits); the pixels are read when the request is decoded (a
    service does that at the job's turn, so a request waiting in line holds no decoded photo).
    Whether the file may be read at all (an upload of this app, a path a local user gave) is the
    front door's decision (:mod:`pulid.serve.uploads`)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def check(self) -> None:
        """Refuse, from the header, a file that cannot be a photo here (:class:`ImageError`)."""
        check_header(check_file(self.path), f"the image {self.path.name}")

    def photo(self) -> np.ndarray:
        """The file as an RGB photo (:func:`load_image`)."""
        return load_image(self.path)

    def mask(self) -> np.ndarray:
        """The file as a mask or region (:func:`load_mask_image`)."""
        return load_mask_image(self.path)


ImageSource = np.ndarray | ImageFile  # what a request's photo, mask or region may be


def photo_pixels(source: ImageSource) -> np.ndarray:
    """A photo's pixels: an array as it is, a file decoded as a photo."""
    return source.photo() if isinstance(source, ImageFile) else source


def mask_pixels(source: ImageSource) -> np.ndarray:
    """A mask's or region's pixels: an array as it is, a file decoded as a mask."""
    return source.mask() if isinstance(source, ImageFile) else source


def load_image_bytes(data: bytes, name: str) -> np.ndarray:
    """An image sent as bytes (an HTTP API's body) as RGB uint8, checked as a file is: its size,
    then its header against the pixel limit, before decoding."""
    check_size(name, len(data))
    with open_checked(io.BytesIO(data), name) as image:
        return upright_rgb8(image)


def upright_rgb8(image) -> np.ndarray:
    """An opened photo's first frame, turned as its EXIF says, as RGB uint8 (:func:`rgb8`)."""
    return rgb8(upright(image))


def upright(image):
    """An opened image's first frame (of an animation), turned as its EXIF says."""
    from PIL import ImageOps

    image.seek(0)
    return ImageOps.exif_transpose(image)


def has_alpha(image) -> bool:
    """Whether an opened image has transparency: an alpha band, or a transparent colour."""
    return "A" in image.getbands() or "transparency" in image.info


def rgb8(image) -> np.ndarray:
    """A decoded image as RGB uint8 (H, W, 3). A 16-bit or 32-bit grey image (PIL's "I;16" and
    "I" modes) is scaled from 0-65535 to 0-255 first: PIL's own conversion clips it, which turns
    most of a 16-bit photo white."""
    from PIL import Image

    if image.mode.startswith("I"):
        grey = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))
    elif image.mode == "F":  # floating-point grey: PIL's own conversion clips to 0-255 as well
        image = Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8))
    return np.asarray(image.convert("RGB"))


MAX_CANVAS_LAYERS = 4  # layers of a drawing in the page that are read (the app's canvas has one)


MAX_PAINTED_SIDE = 2048  # a painting's long side as read: past any output size, which it is resized to
_PAINTINGS_DECODING = threading.BoundedSemaphore(2)  # a flat 50 MP PNG is 200 KB and decodes to 200 MB


def painted_layer(source: bytes | str | os.PathLike, name: str) -> np.ndarray:
    """One painted layer of the page's drawing canvas (bytes or an uploaded file) -> RGBA (H, W, 4)
    uint8; a layer without transparency gets its brightest channel as its opacity. Bytes over the
    upload limit, and images over the pixel limit (from the header), are refused before decoding.
    A layer larger than :data:`MAX_PAINTED_SIDE` (painted over a large photo) is read at that size
    (nearest neighbour: no new colours at stroke edges), and two layers at most decode at once, so
    that what requests hold before their turn stays small."""
    from PIL import Image

    if isinstance(source, (bytes, bytearray, memoryview)):
        check_size(name, len(source))
        source = io.BytesIO(bytes(source))
    with open_checked(source, name) as image, _PAINTINGS_DECODING:
        alpha = has_alpha(image)
        if max(image.size) > MAX_PAINTED_SIDE:
            scale = MAX_PAINTED_SIDE / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.NEAREST)
        if alpha:
            return np.array(image.convert("RGBA"))
        rgb = rgb8(image)
        return np.concatenate([rgb, rgb.max(axis=2, keepdims=True)], axis=2)


def at_first_size(layers: list[np.ndarray]) -> list[np.ndarray]:
    """Painted layers all at the first one's size (nearest-neighbour, so no new colours or
    opacities appear at stroke edges)."""
    from PIL import Image

    height, width = layers[0].shape[:2]
    return [
        layer
        if layer.shape[:2] == (height, width)
        else np.asarray(Image.fromarray(layer).resize((width, height), Image.Resampling.NEAREST))
        for layer in layers
    ]
