"""The FLUX models this app can run: where their weights live and their hyper-parameters."""

from __future__ import annotations

from dataclasses import dataclass

from flux.autoencoder import AutoEncoderParams
from flux.hub import WeightFile
from flux.model import FluxParams

FLUX_DEV_LICENCE = "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md"
FLUX_KREA_LICENCE = "https://huggingface.co/black-forest-labs/FLUX.1-Krea-dev/blob/main/LICENSE.md"

# Sizes: the tensor bytes of the manifests in shared/checkpoints (the files add a small header).
FLUX_DIT_BYTES = 23_802_816_640
AE_BYTES = 335_278_732
FP8_DIT_BYTES = 11_910_628_048


def flux_dev_params() -> FluxParams:
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
    flow: WeightFile
    ae: WeightFile
    fp8_flow: WeightFile | None = None
    fp8_quantization_map: WeightFile | None = None


MODELS: dict[str, ModelSpec] = {
    "flux-dev": ModelSpec(
        name="flux-dev",
        params=flux_dev_params(),
        ae_params=flux_ae_params(),
        flow=WeightFile(
            "black-forest-labs/FLUX.1-dev",
            "flux1-dev.safetensors",
            FLUX_DIT_BYTES,
            "flux1-dev.safetensors",
            "the FLUX.1-dev transformer",
            gated=True,
            licence_url=FLUX_DEV_LICENCE,
        ),
        ae=WeightFile(
            "black-forest-labs/FLUX.1-dev",
            "ae.safetensors",
            AE_BYTES,
            "ae.safetensors",
            "the FLUX.1-dev autoencoder",
            gated=True,
            licence_url=FLUX_DEV_LICENCE,
        ),
        fp8_flow=WeightFile(
            "XLabs-AI/flux-dev-fp8",
            "flux-dev-fp8.safetensors",
            FP8_DIT_BYTES,
            "flux-dev-fp8.safetensors",
            "the FLUX.1-dev transformer in fp8 (XLabs, quanto)",
        ),
        fp8_quantization_map=WeightFile(
            "XLabs-AI/flux-dev-fp8",
            "flux_dev_quantization_map.json",
            26_537,
            "flux_dev_quantization_map.json",
            "the quanto map of the fp8 transformer",
        ),
    ),
    "flux-krea-dev": ModelSpec(
        name="flux-krea-dev",
        params=flux_dev_params(),
        ae_params=flux_ae_params(),
        flow=WeightFile(
            "black-forest-labs/FLUX.1-Krea-dev",
            "flux1-krea-dev.safetensors",
            FLUX_DIT_BYTES,
            "flux1-krea-dev.safetensors",
            "the FLUX.1-Krea-dev transformer",
            gated=True,
            licence_url=FLUX_KREA_LICENCE,
        ),
        ae=WeightFile(
            "black-forest-labs/FLUX.1-Krea-dev",
            "ae.safetensors",
            AE_BYTES,
            "krea-ae.safetensors",
            "the FLUX.1-Krea-dev autoencoder",
            gated=True,
            licence_url=FLUX_KREA_LICENCE,
        ),
    ),
}


def get_model_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"Unknown model {name!r}; choose one of {', '.join(MODELS)}") from None
