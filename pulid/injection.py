"""How the ID tokens enter the DiT: PuLID's implementation of :class:`flux.model.IDInjection`.

After double blocks 0, 2, 4, ... and single blocks 0, 4, 8, ... the image tokens get
``id_weight * cross_attention(id_tokens, image_tokens)``. The cross-attention modules are numbered
in that order: first one per ``double_interval`` double blocks, then one per ``single_interval``
single blocks (10 + 10 = 20 for FLUX.1-dev's 19 + 38 blocks). The injection object is made per
request and handed to the DiT's forward; the DiT keeps nothing of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import Tensor

from pulid.encoders import DOUBLE_INTERVAL, SINGLE_INTERVAL, num_pulid_ca

CrossAttention = Callable[[Tensor, Tensor], Tensor]


class PuLIDInjection:
    """ID tokens (B, 32, 2048) and a weight, applied through the ``pulid_ca`` modules."""

    def __init__(
        self,
        cross_attentions: Sequence[CrossAttention],
        id_tokens: Tensor,
        id_weight: float,
        depth: int,
        depth_single_blocks: int,
        double_interval: int = DOUBLE_INTERVAL,
        single_interval: int = SINGLE_INTERVAL,
    ):
        self.num_double = math.ceil(depth / double_interval)
        expected = num_pulid_ca(depth, depth_single_blocks, double_interval, single_interval)
        if len(cross_attentions) != expected:
            raise ValueError(
                f"{len(cross_attentions)} ID cross-attention modules for a DiT of {depth} double and "
                f"{depth_single_blocks} single blocks; expected {expected}"
            )
        self.cross_attentions = cross_attentions
        self.id_tokens = id_tokens
        self.id_weight = id_weight
        self.double_interval = double_interval
        self.single_interval = single_interval

    def after_double_block(self, index: int, img: Tensor) -> Tensor | None:
        if index % self.double_interval:
            return None
        ca = self.cross_attentions[index // self.double_interval]
        return self.id_weight * ca(self.id_tokens, img)

    def after_single_block(self, index: int, img: Tensor) -> Tensor | None:
        if index % self.single_interval:
            return None
        ca = self.cross_attentions[self.num_double + index // self.single_interval]
        return self.id_weight * ca(self.id_tokens, img)
