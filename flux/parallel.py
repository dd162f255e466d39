"""One image on several GPUs: the DiT's tokens split across ranks (Ulysses sequence parallelism).

Each of ``world`` ranks (one process per GPU, launched by ``torchrun``) holds the same weights and
an equal contiguous share of the text tokens and of the image tokens, in order. Everything in a
block but attention works token by token, so it runs on the rank's own tokens only. Attention
needs every token: :class:`UlyssesAttention` applies RoPE to the rank's queries and keys, then one
all-to-all turns "my tokens, all heads" into "all tokens, my heads" (24 heads: 12 per rank on two
GPUs), each rank attends over the whole sequence for its heads, and a second all-to-all turns the
result back. The whole sequence arrives rank by rank ([text 0, image 0, text 1, image 1]), a
permutation of the one-GPU order; attention without a mask gives each query the same result
under any order of the keys, so only the summation order (float rounding) differs from one GPU.
This is the method of DeepSpeed-Ulysses (the one xDiT/yunchang use for FLUX), written on
PyTorch's functional collectives so that ``torch.compile`` traces through it.

:class:`SequenceParallelFlux` wraps a :class:`~flux.model.Flux` without changing it: each forward
gives the model this rank's tokens and the attention above, then gathers the prediction, so the
sampler and everything after it see whole latents on every rank. An ID injection must be made
for this rank's image tokens (:meth:`SequenceParallelFlux.image_tokens`), and a step cache sees
the first block's residual of the whole image, so every rank takes the same skip decision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn
from torch.nn import functional as F

from flux.conventions import TOKEN_PIXELS
from flux.errors import UserError
from flux.math import apply_rope
from flux.model import Flux, IDInjection, StepCache


class ShardingError(UserError, ValueError):
    """A token count or head count this number of ranks does not divide; the message says what to change."""


@dataclass(frozen=True)
class SequenceShards:
    """Which tokens rank ``rank`` of ``world`` holds: the ``rank``-th of ``world`` equal parts."""

    rank: int
    world: int

    def check(self, count: int, what: str) -> None:
        if count % self.world:
            raise ShardingError(
                f"{count} {what} cannot be split evenly over {self.world} GPUs: choose a size whose "
                f"count is a multiple of {self.world}"
            )

    def part(self, count: int) -> slice:
        """This rank's part of ``count`` tokens."""
        self.check(count, "tokens")
        size = count // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    def take(self, x: Tensor) -> Tensor:
        """This rank's tokens of ``x`` (B, L, ...)."""
        return x[:, self.part(x.shape[1])]


class UlyssesAttention(nn.Module):
    """RoPE, then attention over every rank's tokens for this rank's heads (see the module's
    docstring); the same call signature as :func:`flux.math.attention`."""

    def __init__(self, group: dist.ProcessGroup, world: int):
        super().__init__()
        self.group = group
        self.world = world

    def forward(self, q: Tensor, k: Tensor, v: Tensor, pe: Tensor | None) -> Tensor:
        if pe is not None:
            q, k = apply_rope(q, k, pe)
        b, h, length, d = q.shape
        n = self.world
        heads = h // n
        # One buffer (n, L, B, 3, H/n, D): part j, for rank j, holds head group j of this rank's
        # tokens, token-major, so that what arrives is already one sequence.
        send = q.new_empty(n, length, b, 3, heads, d)
        for index, x in enumerate((q, k, v)):
            send[:, :, :, index] = x.view(b, n, heads, length, d).permute(1, 3, 0, 2, 4)
        received = funcol.all_to_all_single(send.view(n, -1), None, None, self.group)
        # rank i's tokens follow rank i-1's: (n*L, B, 3, H/n, D) is the whole sequence, a view
        q, k, v = received.view(n * length, b, 3, heads, d).permute(2, 1, 3, 0, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H/n, n*L, D)
        back = out.permute(2, 0, 1, 3).contiguous().view(n, -1)  # part i: rank i's tokens
        mine = funcol.all_to_all_single(back, None, None, self.group)
        # part i holds head group i for this rank's tokens: (B, L, H*D) with the heads in order
        return mine.view(n, length, b, heads, d).permute(2, 1, 0, 3, 4).reshape(b, length, h * d)


class _WholeImageCache:
    """A step cache seen through this rank: it compares and stores the first block's residual of
    the whole image (gathered), so every rank decides alike, and keeps the later blocks' residual of
    this rank's tokens."""

    def __init__(self, cache: StepCache, parallel: SequenceParallelFlux):
        self.cache = cache
        self.parallel = parallel

    def reuse(self, first_residual: Tensor) -> Tensor | None:
        return self.cache.reuse(self.parallel.gather(first_residual))

    def store(self, first_residual: Tensor, rest_residual: Tensor) -> None:
        self.cache.store(self.parallel.gather(first_residual), rest_residual)


class SequenceParallelFlux(nn.Module):
    """A :class:`~flux.model.Flux` whose forward runs on this rank's share of the tokens (see the
    module's docstring). Every rank must call it with the same whole inputs."""

    def __init__(self, dit: Flux, group: dist.ProcessGroup | None = None):
        super().__init__()
        self.dit = dit
        self.group = group if group is not None else dist.group.WORLD
        self.shards = SequenceShards(dist.get_rank(self.group), dist.get_world_size(self.group))
        if dit.params.num_heads % self.shards.world:
            raise ShardingError(
                f"the DiT's {dit.params.num_heads} attention heads cannot be split over "
                f"{self.shards.world} GPUs: use a number of GPUs that divides {dit.params.num_heads}"
            )
        self.attention = UlyssesAttention(self.group, self.shards.world)
        # Agreements (a seed, whether to stop) over gloo on the host: no GPU synchronisation
        # between the denoising steps, whatever the main group's backend.
        ranks = dist.get_process_group_ranks(self.group)
        self.control = (
            self.group if dist.get_backend(self.group) == "gloo" else dist.new_group(ranks, backend="gloo")
        )

    @property
    def params(self):
        return self.dit.params

    def check(self, txt_tokens: int, img_tokens: int) -> None:
        """Refuse token counts the ranks cannot share evenly (before any work starts)."""
        self.shards.check(txt_tokens, "text tokens (the T5 length)")
        self.shards.check(img_tokens, f"image tokens ((width / {TOKEN_PIXELS}) x (height / {TOKEN_PIXELS}))")

    def image_tokens(self, count: int) -> slice:
        """Which of ``count`` image tokens this rank holds (for an ID injection's regions)."""
        return self.shards.part(count)

    def same_on_every_rank(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (a seed drawn at random, say)."""
        box = [value]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.control)
        return box[0]

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (every rank must ask)."""
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.control)  # on the host: no GPU sync
        return bool(value.item())

    def gather(self, x: Tensor) -> Tensor:
        """Every rank's tokens of ``x`` (B, L/world, ...) in order: (B, L, ...)."""
        parts = [torch.empty_like(x) for _ in range(self.shards.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        id_injection: IDInjection | None = None,
        step_cache: StepCache | None = None,
    ) -> Tensor:
        """:meth:`Flux.forward` on this rank's tokens; returns the whole prediction (B, L_img, C).
        ``id_injection`` must already be this rank's (:meth:`image_tokens`)."""
        self.check(txt.shape[1], img.shape[1])
        take = self.shards.take
        local = self.dit(
            img=take(img),
            img_ids=take(img_ids),
            txt=take(txt),
            txt_ids=take(txt_ids),
            timesteps=timesteps,
            y=y,
            guidance=guidance,
            id_injection=id_injection,
            step_cache=None if step_cache is None else _WholeImageCache(step_cache, self),
            attention=self.attention,
        )
        return self.gather(local)
