"""How the ID tokens enter the DiT: PuLID's implementation of :class:`flux.model.IDInjection`.

After double blocks 0, 2, 4, ... and single blocks 0, 4, 8, ... the image tokens get
``id_weight * cross_attention(id_tokens, image_tokens)``. The cross-attention modules are numbered
in that order: first one per ``double_interval`` double blocks, then one per ``single_interval``
single blocks (10 + 10 = 20 for FLUX.1-dev's 19 + 38 blocks). The injection object is made per
request and handed to the DiT's forward; the DiT keeps nothing of it.

Several people: each :class:`Identity` has its own tokens, weight and region. At every insertion
point each identity's cross-attention reads the same image tokens (the block's output), its
output is multiplied by its region (a per-token factor in [0, 1]) and the products are summed, so
the order of the identities does not matter and a token outside every region gets no ID. The
cross-attention is token-wise (each image token attends over the 32 ID tokens only), so a region
changes nothing inside it, and an identity whose region leaves out many tokens runs its
cross-attention on the tokens it reaches only (:meth:`Identity.within`): two people side by side
cost about one cross-attention pass, not two. An identity without a region covers every token:
one identity without a region is the official single-ID computation, operation for operation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pulid.encoders import DOUBLE_INTERVAL, SINGLE_INTERVAL, num_pulid_ca

CrossAttention = Callable[[Tensor, Tensor], Tensor]
GATHER_BELOW = 0.9  # run the cross-attention on a region's tokens only when it reaches fewer
TOKEN_BUCKET = 256  # ... padded to a multiple of this, so compiled blocks meet few shapes


@dataclass(frozen=True)
class Identity:
    """One person: ID tokens (B, 32, 2048), their weight, and where they go: a factor per image
    token (1, L_img, 1) in [0, 1], or None for every token. With ``index``, the cross-attention
    runs on those image tokens only and ``factors`` (1, len(index), 1) are the region there (see
    :meth:`within`)."""

    tokens: Tensor
    weight: float
    region: Tensor | None = None
    index: Tensor | None = None
    factors: Tensor | None = None

    @classmethod
    def within(cls, tokens: Tensor, weight: float, region: Tensor | None) -> Identity:
        """An identity in ``region`` that, when the region leaves out enough tokens, visits only
        the tokens it reaches. Their indices are padded to a multiple of :data:`TOKEN_BUCKET` with
        token 0 at factor 0 (it receives exactly nothing from the padding)."""
        if region is None:
            return cls(tokens, weight)
        reached = (region[0, :, 0] > 0).nonzero()[:, 0]
        if reached.numel() >= GATHER_BELOW * region.shape[1]:
            return cls(tokens, weight, region)
        pad = -reached.numel() % TOKEN_BUCKET
        index = torch.cat([reached, reached.new_zeros(pad)])
        factors = torch.cat([region[:, reached], region.new_zeros(1, pad, 1)], dim=1)
        return cls(tokens, weight, region, index, factors)

    def part(self, tokens: slice) -> Identity:
        """This identity for the image tokens ``tokens`` only: one rank's share of them when the
        DiT's tokens are split over several GPUs (:mod:`flux.parallel`)."""
        region = None if self.region is None else self.region[:, tokens]
        return Identity.within(self.tokens, self.weight, region)


class PuLIDInjection:
    """Identities applied through the ``pulid_ca`` modules (see the module's docstring)."""

    def __init__(
        self,
        cross_attentions: Sequence[CrossAttention],
        identities: Sequence[Identity],
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
        if not identities:
            raise ValueError("an ID injection needs at least one identity")
        self.cross_attentions = cross_attentions
        self.identities = tuple(identities)
        self.double_interval = double_interval
        self.single_interval = single_interval

    def after_double_block(self, index: int, img: Tensor) -> Tensor | None:
        if index % self.double_interval:
            return None
        return self._residual(self.cross_attentions[index // self.double_interval], img)

    def after_single_block(self, index: int, img: Tensor) -> Tensor | None:
        if index % self.single_interval:
            return None
        return self._residual(self.cross_attentions[self.num_double + index // self.single_interval], img)

    def _residual(self, ca: CrossAttention, img: Tensor) -> Tensor:
        total = None
        for identity in self.identities:
            if identity.index is not None:  # the region's tokens only, added back in place
                part = identity.weight * ca(identity.tokens, img.index_select(1, identity.index))
                if total is None:
                    total = torch.zeros_like(img)
                total.index_add_(1, identity.index, part * identity.factors)
                continue
            out = identity.weight * ca(identity.tokens, img)
            if identity.region is not None:
                out = out * identity.region
            total = out if total is None else total + out
        return total
