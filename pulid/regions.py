"""Where each person of a several-people image goes: regions at the image's size and at the DiT's
token grid.

A region is drawn or uploaded like an inpainting mask (white: this person; see
:func:`pulid.request.mask_values`), or comes from a preset layout: with ``columns`` the people
stand side by side in equal columns, left to right in their order (left/right for two,
left/middle/right for three). At the token grid each image token (a 16 x 16 pixel patch) gets the
share of its pixels that the region paints, so columns that split a token share it and every token
of a columns layout sums to exactly 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from flux.conventions import TOKEN_PIXELS
from pulid.images import at_first_size
from pulid.settings import InvalidRequestError

if TYPE_CHECKING:  # torch is imported where the token grid is made: the settings need this module
    from torch import Tensor

LAYOUTS = ("columns", "masks")
# The brush colours of the page's region painting, person 1 first: red, green, blue, yellow.
PALETTE = ((230, 25, 75), (60, 180, 75), (67, 99, 216), (255, 225, 25))
MIN_REGION_TOKENS = 4.0  # a 32 x 32-pixel square: a region smaller than this cannot hold a face


def column_regions(count: int, width: int, height: int) -> list[np.ndarray]:
    """``count`` side-by-side columns of an image, left to right, as (H, W) uint8 masks (255: in)."""
    edges = [round(i * width / count) for i in range(count + 1)]
    regions = []
    for left, right in zip(edges[:-1], edges[1:], strict=True):
        region = np.zeros((height, width), np.uint8)
        region[:, left:right] = 255
        regions.append(region)
    return regions


def token_region(values: np.ndarray) -> Tensor:
    """A region (H, W) uint8 at the image's size (H and W multiples of 16) -> (1, L, 1) float32:
    each image token's share of pixels of 128 and above, in the DiT's token order (row-major)."""
    import torch
    from torch.nn import functional as F

    painted = torch.from_numpy((values >= 128).astype(np.float32))[None, None]
    share = F.avg_pool2d(painted, TOKEN_PIXELS)
    return share.reshape(1, -1, 1)


def check_region_area(region: Tensor, who: str) -> None:
    """Refuse a region too small to hold a face (see :data:`MIN_REGION_TOKENS`)."""
    if float(region.sum()) < MIN_REGION_TOKENS:
        raise InvalidRequestError(
            f"{who}'s region is too small to hold a face (under 32 x 32 pixels of the image): "
            "paint a larger one."
        )


def overlap_share(regions: list[Tensor]) -> float:
    """The share of image tokens where the regions' factors sum above 1: where regions overlap
    (each identity adds its own ID there). Columns that share a token split it, so they never do."""
    import torch

    total = torch.stack(regions).sum(dim=0)
    return float((total > 1 + 1e-6).float().mean())


def covers_everything(region: Tensor) -> bool:
    """Whether a region is the whole image (its person needs no masking)."""
    return bool((region == 1).all())


def painted_regions(layers: list[np.ndarray], count: int) -> list[np.ndarray | None]:
    """Each person's region from the page's region painting (RGBA layers (H, W, 4), later layers
    over earlier): a painted pixel (opacity 128 or more) belongs to the person whose brush colour
    (:data:`PALETTE`) is nearest to its colour. One (H, W) uint8 mask per person for the first
    ``count`` people, None for a person nobody painted."""
    if not layers:
        return [None] * count
    owner = np.full(layers[0].shape[:2], -1, np.int8)
    for layer in at_first_size(layers):
        # one colour and one channel at a time: some 20 bytes a pixel, where all at once took 96
        nearest = np.zeros(owner.shape, np.int8)
        best = np.full(owner.shape, np.iinfo(np.int32).max, np.int32)
        distance = np.empty(owner.shape, np.int32)
        channel = np.empty(owner.shape, np.int32)
        for person, colour in enumerate(PALETTE):
            distance.fill(0)
            for index, value in enumerate(colour):
                np.subtract(layer[..., index], value, out=channel, dtype=np.int32)
                distance += np.square(channel, out=channel)
            closer = distance < best  # ties keep the earlier colour, as argmin does
            np.copyto(best, distance, where=closer)
            np.copyto(nearest, person, where=closer)
        painted = layer[..., 3] >= 128
        np.copyto(owner, nearest, where=painted)
    return [
        (owner == person).astype(np.uint8) * 255 if (owner == person).any() else None
        for person in range(count)
    ]
