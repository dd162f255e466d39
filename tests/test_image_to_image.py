"""Image to image: start from a photo's latents, noised to the schedule's time for the strength.

Checked against an independent float64 computation (the AE encoder's posterior mean and the DiT
of ``tests/reference_flux``) on the tiny pipeline, plus the schedule rule, the noising, the
request's checks and metadata, and the ID start step counted from the first step that runs.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from flux.sampling import get_noise, get_schedule, image_ids, image_to_image_start, noised, pack
from pulid.images import ImageError, ImageFile
from pulid.pipeline import fit_image
from pulid.request import GenerationRequest, InvalidRequestError
from tests.numerics import fresh_seed, rel_err
from tests.reference_flux import ae_encode_mean, flux_forward
from tests.stubs import photo
from tests.tiny_models import init_photo

TOL_PIPELINE = 1e-4  # the float32 pipeline (AE encoder and DiT) against float64 references


def request(**kw):
    values = {"prompt": "a portrait of a woman", "width": 320, "height": 256, "num_steps": 3, "seed": 7}
    return GenerationRequest(**{**values, **kw})


@pytest.mark.parametrize("steps", [1, 4, 10, 28, 50])
def test_the_start_is_bfl_rule_and_leaves_a_step(steps):
    for strength in (0.01, 0.05, 0.3, 0.5, 0.7, 0.75, 0.99, 1.0):
        start = image_to_image_start(steps, strength)
        assert start == min(int((1 - strength) * steps), steps - 1)
        assert 0 <= start < steps
    assert image_to_image_start(steps, 1.0) == 0
    for bad in (0.0, -0.1, 1.01, float("nan")):
        with pytest.raises(ValueError):
            image_to_image_start(steps, bad)


def test_noising_is_the_flow_interpolation():
    g = torch.Generator().manual_seed(fresh_seed())
    latents, noise = torch.randn(2, 16, 6, 8, generator=g), torch.randn(2, 16, 6, 8, generator=g)
    t = float(torch.rand((), generator=g))
    expected = t * noise.double() + (1 - t) * latents.double()
    assert rel_err(noised(latents, noise, t), expected) < 1e-6
    assert torch.equal(noised(latents, noise, 1.0), noise)


def test_strength_one_is_text_to_image(pipeline):
    plain = pipeline.generate(request())
    started = pipeline.generate(request(init_image=init_photo(1), strength=1.0))
    assert torch.equal(started.latents, plain.latents)


def test_one_step_from_a_photo_matches_the_float64_reference(pipeline):
    image = init_photo(fresh_seed() % 1000)
    strength = 0.2  # int(0.8 * 3) = 2: only the last of the 3 steps runs
    result = pipeline.generate(request(init_image=image, strength=strength))

    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].double() / 127.5 - 1
    x0 = ae_encode_mean(pipeline.ae.state_dict(), pipeline.ae.params, pixels)
    noise = get_noise(1, 256, 320, "cpu", torch.float32, seed=7).double()
    schedule = get_schedule(3, noise.shape[-1] * noise.shape[-2] // 4)
    t, t_next = schedule[2], schedule[3]
    x_t = pack(t * noise + (1 - t) * x0)
    cond = pipeline.encode_prompt("a portrait of a woman", 128)
    pred = flux_forward(
        pipeline.dit.state_dict(),
        pipeline.dit.params,
        img=x_t,
        img_ids=image_ids(1, 32, 40).double(),
        txt=cond.txt.double(),
        txt_ids=cond.txt_ids.double(),
        timesteps=torch.full((1,), t, dtype=torch.float64),
        y=cond.vec.double(),
        guidance=torch.full((1,), 4.0, dtype=torch.float64),
    )
    expected = x_t + (t_next - t) * pred
    assert rel_err(result.latents, expected) < TOL_PIPELINE


def test_the_id_start_step_counts_from_the_first_step_that_runs(pipeline):
    face = photo(3)
    base = {"init_image": init_photo(2), "strength": 0.5}  # int(0.5 * 3) = 1: steps 2 and 3 run
    without_id = pipeline.generate(request(**base))
    from_second = pipeline.generate(request(**base, id_images=[face], start_step=1))
    after_last = pipeline.generate(request(**base, id_images=[face], start_step=2))
    assert torch.equal(after_last.latents, without_id.latents)  # 2 steps run: step 2 is past them
    assert not torch.equal(from_second.latents, without_id.latents)


def test_a_photo_of_another_shape_is_centre_cropped_then_resized():
    wide = np.zeros((40, 120, 3), np.uint8)
    wide[:, :40] = 255  # a white band on the left, cut off by the centre crop to 1:1
    fitted, note = fit_image(wide, 32, 32)
    assert fitted.shape == (32, 32, 3) and fitted.max() == 0
    assert note == "cropped from 120x40 to 40x40 and resized to 32x32"
    same, note = fit_image(init_photo(5, 32, 48), 48, 32)
    assert note == "" and np.array_equal(same, init_photo(5, 32, 48))


def test_metadata_records_the_photo_hash_and_the_fit(pipeline):
    image = init_photo(4, 60, 60)
    result = pipeline.generate(request(init_image=image, strength=0.6))
    digest = hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()
    assert result.metadata["init_image"] == f"sha256:{digest[:16]}"
    assert result.metadata["strength"] == 0.6
    assert result.metadata["init_image_fit"] == "cropped from 60x60 to 60x48 and resized to 320x256"
    assert "init_image" not in pipeline.generate(request()).metadata


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"strength": 0.0}, "strength must be a number from 0.01 to 1"),
        ({"strength": float("nan")}, "strength must be a number"),
        ({"init_image": "photo.png"}, "photo to start from must be an image"),
        ({"init_image": np.zeros((8, 8), np.uint8)}, "photo to start from must be an image"),
    ],
)
def test_bad_image_to_image_requests_are_refused(pipeline, kw, message):
    with pytest.raises(InvalidRequestError, match=message):
        pipeline.generate(request(**kw))


# ---------------------------------------------------------------- through the service (the app's door)


def test_an_uploaded_photo_to_start_from_gives_the_array_result(uploading_service, pipeline):
    from PIL import Image

    from pulid.outputs import read_image_metadata

    svc, uploads = uploading_service
    image = init_photo(6)
    path = uploads / "start.png"
    Image.fromarray(image).save(path)
    settings = {"prompt": "a portrait of a woman", "width": 320, "height": 256, "num_steps": 3, "seed": 7}
    result = svc.run(GenerationRequest.from_values(strength="0.5", init_image=ImageFile(path), **settings))
    direct = pipeline.generate(request(init_image=image, strength=0.5))
    assert np.array_equal(np.asarray(Image.open(result.path).convert("RGB")), np.asarray(direct.image))
    stored = read_image_metadata(result.path)
    assert stored["init_image"] == direct.metadata["init_image"] and str(path) not in str(stored)


def test_a_photo_to_start_from_that_was_not_uploaded_is_refused(uploading_service, tmp_path):
    from pulid.serve.service import ServiceError

    svc, _ = uploading_service
    elsewhere = tmp_path / "secret.png"
    from PIL import Image

    Image.fromarray(init_photo(7)).save(elsewhere)
    with pytest.raises(ServiceError, match="upload"):  # refused before the file is opened
        svc.run(GenerationRequest(prompt="a portrait", init_image=ImageFile(elsewhere)))
    broken = uploading_service[1] / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ServiceError, match="broken.png"):
        svc.run(GenerationRequest(prompt="a portrait", init_image=ImageFile(broken)))
    with pytest.raises(ImageError, match="broken.png"):  # a front door's own check
        GenerationRequest.from_values(prompt="a portrait", init_image=ImageFile(broken))


@pytest.mark.parametrize("which", ["all-streamed", "smallest"])
def test_a_memory_placement_brings_the_encoder_in_and_changes_nothing(pipeline, which):
    """The photo is encoded before denoising: the autoencoder's stage is entered through its
    encoder, then the DiT's, and the latents are those of the resident pipeline."""
    from flux.offload import PipelinePlacement, measure
    from tests.offload_helpers import NO_RESERVES, LoggingTransfer, tiny_plans

    wanted = request(init_image=init_photo(8), strength=0.7, num_steps=2)
    expected = pipeline.generate(wanted).latents
    components = pipeline.components()
    plan = tiny_plans(measure(components))[which]
    with PipelinePlacement(
        components, NO_RESERVES, plan, "cpu", transfer=LoggingTransfer()
    ).attach() as placed:
        result = pipeline.generate(wanted).latents
        assert placed.log == ["text", "decode", "denoise", "decode"]
    assert torch.equal(result, expected)


@pytest.mark.parametrize(
    "photo_size, pixels, expected",
    [
        ((512, 512), 256 * 256, (256, 256)),  # square stays square at the same area
        ((4000, 3000), 1024 * 1024, (1184, 880)),  # 4:3 at one megapixel, multiples of 16
        ((3000, 4000), 896 * 1152, (880, 1168)),
        ((120, 40), 256 * 256, (768, 256)),  # 3:1 at a small area: the short side is raised to 256
        ((10000, 100), 1024 * 1024, (1536, 256)),  # 100:1 cannot fit: both sides at their limits
    ],
)
def test_the_size_follows_the_photo_to_start_from(photo_size, pixels, expected):
    from pulid.request import size_for_photo

    width, height = size_for_photo(*photo_size, pixels)
    assert (width, height) == expected
    request(width=width, height=height).checked()  # an allowed size
