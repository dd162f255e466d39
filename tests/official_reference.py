"""The official code's arithmetic over our modules' weights: the autoencoder's attention and
``generate_image``'s decoding (shared by the parity tests and the decoding benchmark)."""

import copy

import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import nn

from flux.autoencoder import AttnBlock, AutoEncoder
from flux.sampling import unpack


class OfficialAttnBlock(nn.Module):
    """The official ``AttnBlock.attention`` arithmetic, over the weights of one of ours."""

    def __init__(self, ours: AttnBlock):
        super().__init__()
        self.norm, self.q, self.k, self.v, self.proj_out = ours.norm, ours.q, ours.k, ours.v, ours.proj_out

    def forward(self, x):
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        q = rearrange(q, "b c h w -> b 1 (h w) c").contiguous()
        k = rearrange(k, "b c h w -> b 1 (h w) c").contiguous()
        v = rearrange(v, "b c h w -> b 1 (h w) c").contiguous()
        h_ = F.scaled_dot_product_attention(q, k, v)
        h_ = rearrange(h_, "b 1 (h w) c -> b c h w", h=h, w=w, c=c, b=b)
        return x + self.proj_out(h_)


def with_attention(ae: AutoEncoder, block_type) -> AutoEncoder:
    """A copy of ``ae`` whose attention blocks are ``block_type(block)``, sharing their weights."""
    copied = copy.deepcopy(ae)
    for name, module in list(copied.named_modules()):
        if isinstance(module, AttnBlock):
            parent, _, child = name.rpartition(".")
            setattr(copied.get_submodule(parent), child, block_type(module))
    return copied


def official_autoencoder(ae: AutoEncoder) -> AutoEncoder:
    """A copy of ``ae`` whose attention blocks compute in the official arithmetic (same weights)."""
    return with_attention(ae, OfficialAttnBlock)


def official_decode(reference: AutoEncoder, latents: torch.Tensor, height: int, width: int, autocast: bool):
    """``generate_image``'s last lines: unpack, decode under bf16 autocast, then to PIL."""
    x = unpack(latents.float(), height, width)
    with torch.no_grad(), torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=autocast):
        x = reference.decode(x)
    x = x.clamp(-1, 1)
    x = rearrange(x[0], "c h w -> h w c")
    return Image.fromarray((127.5 * (x + 1.0)).cpu().byte().numpy())
