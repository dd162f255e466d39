"""The upload door: only files that were uploaded, only regular files, only sizes a server takes.

A file-typed input of the HTTP API is a path on the server. A hostile client can name a path that
was never uploaded (``/etc/passwd``, the app's own files), a FIFO or a device (which blocks the
worker that opens it), or a small file whose header declares a huge image. :func:`check_upload`
refuses all of these before anything is opened, and the decoding (:mod:`pulid.images`) reads only
the header before it decides to decode. Refusals raise :class:`UploadError`, an
:class:`~pulid.images.ImageError` with a message for the user.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pulid.images import ImageError, ImageFile, check_file, load_image, load_mask_image


class UploadError(ImageError):
    """A file the user named was not uploaded here, or is gone; the message says what to do."""


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_upload(path: str | os.PathLike, roots: Sequence[str | os.PathLike] | None = None) -> Path:
    """``path`` resolved, if it is a regular file within ``roots`` (when given) and not too large.

    ``roots``: the folders uploads are stored in (gradio's upload cache); ``None`` for paths a
    local user gave (the command line), where any regular file may be read.
    """
    name = Path(str(path)).name or str(path)
    if "://" in str(path):
        raise UploadError(f"{name[:60]} is a URL: upload the photo itself.")
    resolved = Path(path).resolve()  # symbolic links and '..' are followed before the check
    if roots is not None and not any(_inside(resolved, Path(root).resolve()) for root in roots):
        raise UploadError(f"{name[:60]} was not uploaded to this app: upload the photo itself.")
    if roots is not None and not resolved.exists():  # an upload the app no longer keeps (an hour)
        raise UploadError(f"{name[:60]} is no longer on the server: upload it again.")
    return check_file(resolved)


def uploaded_image(path: str | os.PathLike, roots: Sequence[str | os.PathLike] | None = None) -> ImageFile:
    """A file input of a request as an :class:`~pulid.images.ImageFile`, if it is an upload
    (:func:`check_upload`); its header is checked with the request, its pixels read at its turn."""
    return ImageFile(check_upload(path, roots))


def load_upload(path: str | os.PathLike, roots: Sequence[str | os.PathLike] | None = None) -> np.ndarray:
    """An uploaded photo (:func:`check_upload`) as RGB uint8 (:func:`pulid.images.load_image`)."""
    return load_image(check_upload(path, roots))


def load_mask(path: str | os.PathLike, roots: Sequence[str | os.PathLike] | None = None) -> np.ndarray:
    """An uploaded mask or region (:func:`check_upload`) as (H, W) uint8
    (:func:`pulid.images.load_mask_image`)."""
    return load_mask_image(check_upload(path, roots))
