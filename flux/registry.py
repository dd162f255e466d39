"""The FLUX models this app can run, by name: their hyper-parameters.

Where their weight files come from is the weight catalogue's business (``pulid.catalogue``).
"""

from __future__ import annotations

from dataclasses import dataclass

from flux.params import AutoEncoderParams, FluxParams


def flux_dev_params() -> FluxParams:
    """FLUX.1-dev's DiT hyper-parameters (FLUX.1-Krea-dev shares them)."""
    return FluxParams(
        in_channels=64,
        vec_in_dim=768,
        context_in_dim=4096,
        hidden_size=3072,
        mlp_ratio=4.0,
        num_heads=24,
        depth=19,
        depth_single_blocks=38,
        axes_dim=[16, 56, 56],
        theta=10_000,
        qkv_bias=True,
        guidance_embed=True,
    )


def flux_ae_params() -> AutoEncoderParams:
    """The FLUX autoencoder's hyper-parameters (16 latent channels, 8x downsampling)."""
    return AutoEncoderParams(
        resolution=256,
        in_channels=3,
        ch=128,
        out_ch=3,
        ch_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        z_channels=16,
        scale_factor=0.3611,
        shift_factor=0.1159,
    )


@dataclass(frozen=True)
class ModelSpec:
    name: str
    params: FluxParams
    ae_params: AutoEncoderParams


# FLUX.1-Krea-dev is a fine-tune of FLUX.1-dev: same architecture, other weights.
MODELS: dict[str, ModelSpec] = {
    name: ModelSpec(name=name, params=flux_dev_params(), ae_params=flux_ae_params())
    for name in ("flux-dev", "flux-krea-dev")
}


def get_model_spec(name: str) -> ModelSpec:
    """The registered model ``name``, or ValueError naming the known ones."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"Unknown model {name!r}; choose one of {', '.join(MODELS)}") from None
