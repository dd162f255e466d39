"""Official parity: the defaults of the official demo, and the decoded image bit for bit.

The reference below is the official app's decoding written out in its own arithmetic (einops
rearranges around the autoencoder's attention, clamp and ``127.5 * (x + 1)`` on the decoder's
output dtype, truncating ``.byte()``), run on a copy of the same autoencoder. The pipeline's
:meth:`~pulid.pipeline.PuLIDFluxPipeline.decode` must give the same pixels exactly, on fresh
random weights and latents, under bf16 autocast (the official setting) and in float32.
"""

import numpy as np
import pytest
import torch

from flux.autoencoder import AutoEncoder
from flux.sampling import pack
from pulid.assembly import PipelineModels, assemble_pipeline
from pulid.request import GenerationRequest, generation_settings
from tests.official_reference import official_autoencoder, official_decode
from tiny_random.models import tiny_ae_params  # 8x upsampling, as the real AE


def random_ae(seed: int) -> AutoEncoder:
    generator = torch.Generator().manual_seed(seed)
    ae = AutoEncoder(tiny_ae_params())
    with torch.no_grad():
        for param in ae.parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if param.ndim == 1 else noise / param[0].numel() ** 0.5)
    return ae.eval()


@pytest.mark.parametrize(
    "dtype,side",
    # bf16 autocast is the official setting; bf16 convolutions are slow on CPUs without bf16 units,
    # so that case decodes a 64x64 image (the attention still covers every pixel of its latent).
    [(torch.bfloat16, 64), (torch.float32, 128)],
    ids=["bf16-autocast", "float32"],
)
def test_decoded_image_equals_the_official_bit_for_bit(dtype, side):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    ae = random_ae(seed)
    latents = pack(torch.randn(1, 16, side // 8, side // 8, generator=torch.Generator().manual_seed(seed)))
    pipeline = assemble_pipeline(PipelineModels(ae), "cpu", dtype)
    ours = np.asarray(pipeline.decode(latents, side, side))
    reference = official_autoencoder(ae)
    official = np.asarray(official_decode(reference, latents, side, side, autocast=dtype == torch.bfloat16))
    assert ours.dtype == np.uint8 and ours.shape == (side, side, 3)
    assert np.array_equal(ours, official), f"{(ours != official).mean():.1%} of values differ (seed {seed})"
    assert ours.std() > 10  # a real image of noise, not a constant that would match trivially


def test_defaults_are_the_official_demos():
    """The official app_flux.py: sliders (min, max, value, step) and text defaults."""
    official = {
        "id_weight": 1.0,
        "width": 896,
        "height": 1152,
        "num_steps": 28,
        "start_step": 0,
        "guidance": 4.0,
        "seed": -1,
        "max_sequence_length": 128,
        "neg_prompt": "bad quality, worst quality, text, signature, watermark, extra limbs",
        "true_cfg": 1.0,
        "cfg_start_step": 1,
    }
    request = GenerationRequest(prompt="portrait, color, cinematic")
    assert {name: getattr(request, name) for name in official} == official
    declared = {s.name: s for s in generation_settings()}
    assert declared["prompt"].default == "portrait, color, cinematic"
    assert (declared["num_steps"].minimum, declared["num_steps"].maximum) >= (
        1,
        30,
    )  # the slider may go higher
    assert (declared["width"].minimum, declared["width"].maximum, declared["width"].step) == (256, 1536, 16)
    assert (declared["start_step"].minimum, declared["start_step"].maximum) == (0, 10)
    assert (declared["guidance"].minimum, declared["guidance"].maximum) == (1.0, 10.0)
