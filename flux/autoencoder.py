"""The FLUX autoencoder (16 latent channels, 8x downsampling), in the ``ae.safetensors`` key layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flux.params import AutoEncoderParams


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q, k, v and the output are 1x1 convolutions."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.norm = _group_norm(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def attention(self, h: Tensor) -> Tensor:
        """Pixels as tokens, in the official memory layout: q, k and v contiguous (b, 1, h*w, c), so
        SDPA takes its fused kernels (a strided view sends it to the slow math path, with other
        roundings under bf16 autocast), and the result viewed back as (b, c, h, w) channels-last."""
        h = self.norm(h)
        b, c, height, width = h.shape

        def tokens(t: Tensor) -> Tensor:
            return t.permute(0, 2, 3, 1).reshape(b, 1, height * width, c).contiguous()

        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        return out.reshape(b, height, width, c).permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.proj_out(self.attention(x))


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 convolution after padding one pixel on the right and bottom only."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stage(nn.Module):
    """Container whose attribute names give the official keys (``down.1.block.0``...)."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(
        self,
        resolution: int,
        in_channels: int,
        ch: int,
        ch_mult: list[int],
        num_res_blocks: int,
        z_channels: int,
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for level in range(self.num_resolutions):
            block_in = ch * in_ch_mult[level]
            block_out = ch * ch_mult[level]
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            stage = _Stage(blocks)
            if level != self.num_resolutions - 1:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = _Mid(block_in)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level, stage in enumerate(self.down):
            for block in stage.block:
                h = block(h)
            if level != self.num_resolutions - 1:
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(
        self,
        ch: int,
        out_ch: int,
        ch_mult: list[int],
        num_res_blocks: int,
        in_channels: int,
        resolution: int,
        z_channels: int,
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _Mid(block_in)
        stages: list[nn.Module] = []
        for level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[level]
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            stage = _Stage(blocks)
            if level != 0:
                stage.upsample = Upsample(block_in)
            stages.insert(0, stage)
        # ``up.0`` is the full-resolution stage, ``up.{n-1}`` the lowest: the official ordering.
        self.up = nn.ModuleList(stages)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(range(self.num_resolutions)):
            stage = self.up[level]
            for block in stage.block:
                h = block(h)
            if level != 0:
                h = stage.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class DiagonalGaussian(nn.Module):
    """Posterior of the encoder: a sample (or the mean) of N(mean, exp(logvar))."""

    def __init__(self, sample: bool = True, chunk_dim: int = 1):
        super().__init__()
        self.sample = sample
        self.chunk_dim = chunk_dim

    def forward(self, z: Tensor, sample: bool | None = None) -> Tensor:
        """A sample, or the mean; ``sample`` overrides the module's choice for one call."""
        mean, logvar = torch.chunk(z, 2, dim=self.chunk_dim)
        if self.sample if sample is None else sample:
            return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        return mean


class AutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(
            params.resolution,
            params.in_channels,
            params.ch,
            params.ch_mult,
            params.num_res_blocks,
            params.z_channels,
        )
        self.decoder = Decoder(
            params.ch,
            params.out_ch,
            params.ch_mult,
            params.num_res_blocks,
            params.in_channels,
            params.resolution,
            params.z_channels,
        )
        self.reg = DiagonalGaussian()
        self.scale_factor = params.scale_factor
        self.shift_factor = params.shift_factor

    def encode(self, x: Tensor, *, mean: bool = False) -> Tensor:
        """Image in [-1, 1] -> scaled, shifted latent: a sample of the posterior, or with ``mean``
        its mean (deterministic: what image-to-image starts from, so a seed repeats its image)."""
        z = self.reg(self.encoder(x), sample=False if mean else None)
        return self.scale_factor * (z - self.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent -> image in roughly [-1, 1]."""
        return self.decoder(z / self.scale_factor + self.shift_factor)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))
