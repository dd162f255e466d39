"""One call from a photo to ID tokens and an image, through the code the app uses.

The tiny-random preset runs the real insightface / onnxruntime / facexlib code on stand-in face
models, the real EVA tower (timm), IDFormer, DiT, AE and text encoders at tiny sizes.
"""

import numpy as np
import pytest
import torch
from skimage import data as skimage_data

from pulid.errors import NoFaceError
from pulid.outputs import read_image_metadata, save_image
from pulid.request import GenerationRequest
from tiny_random.pipeline import tiny_face_analyzer, tiny_pipeline


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, models_dir):
    return tiny_pipeline(tmp_path_factory.mktemp("tiny"), tiny_face_analyzer(models_dir))


def request(**kw):
    return GenerationRequest(
        **{
            "prompt": "portrait, color, cinematic",
            "width": 256,
            "height": 320,
            "num_steps": 2,
            "seed": 3,
            **kw,
        }
    )


def test_photo_to_id_tokens_to_image(pipeline):
    photo = skimage_data.astronaut()
    embedding = pipeline.id_encoder([photo], with_uncond=True)
    assert embedding.tokens.shape == (1, 8, 48)  # tiny IDFormer: 8 queries of width 48
    assert embedding.uncond_tokens.shape == embedding.tokens.shape
    assert torch.isfinite(embedding.tokens).all()
    assert len(embedding.debug_images) == 3  # detected, aligned, parsed face

    result = pipeline.generate(request(id_images=[photo]))
    plain = pipeline.generate(request())
    assert result.image.size == (256, 320)
    assert not torch.equal(result.latents, plain.latents)  # the identity reached the DiT
    assert [img.shape[-1] for img in result.debug_images] == [3, 3, 3]


def test_png_carries_prompt_seed_and_settings(pipeline, tmp_path):
    result = pipeline.generate(request(id_images=[skimage_data.astronaut()], seed=11))
    path = save_image(result.image, result.metadata, tmp_path / "out.png")
    meta = read_image_metadata(path)
    assert meta["seed"] == 11 and meta["prompt"] == "portrait, color, cinematic"
    assert meta["width"] == 256 and meta["num_steps"] == 2 and meta["num_id_images"] == 1


def test_no_face_is_a_typed_error_and_the_pipeline_keeps_working(pipeline):
    blank = np.full((300, 300, 3), 128, dtype=np.uint8)
    with pytest.raises(NoFaceError, match="No face found in the ID image"):
        pipeline.generate(request(id_images=[blank]))
    assert pipeline.generate(request()).image.size == (256, 320)
