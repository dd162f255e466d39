"""Tiny hyper-parameters that keep the official structure (every block type, every key pattern)."""

from flux.autoencoder import AutoEncoderParams
from flux.model import FluxParams


def tiny_flux_params(**overrides) -> FluxParams:
    values = dict(
        in_channels=64,
        vec_in_dim=16,
        context_in_dim=24,
        hidden_size=64,
        mlp_ratio=4.0,
        num_heads=2,
        depth=2,
        depth_single_blocks=3,
        axes_dim=[8, 12, 12],
        theta=10_000,
        qkv_bias=True,
        guidance_embed=True,
    )
    values.update(overrides)
    return FluxParams(**values)


def tiny_ae_params(**overrides) -> AutoEncoderParams:
    values = dict(
        resolution=32,
        in_channels=3,
        ch=32,
        out_ch=3,
        ch_mult=[1, 2],
        num_res_blocks=1,
        z_channels=16,
        scale_factor=0.3611,
        shift_factor=0.1159,
    )
    values.update(overrides)
    return AutoEncoderParams(**values)
