"""Inpainting: a mask over the photo to start from says what to repaint; the rest stays the photo's.

After every step the latents outside the mask are the photo's latents noised to that step's time
with the image's own noise; after the last step they are the photo's latents. Checked on the tiny
pipeline against float64 computations of that blend, plus the mask's checks and metadata.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from flux.sampling import Inpainting, get_noise, get_schedule, image_to_image_start, pack
from pulid.images import ImageFile
from pulid.pipeline import fit_image, latent_mask
from pulid.request import GenerationRequest, InvalidRequestError
from tests.numerics import fresh_seed, rel_err
from tests.tiny_models import init_photo


def request(**kw):
    values = {"prompt": "a portrait of a woman", "width": 320, "height": 256, "num_steps": 3, "seed": 7}
    return GenerationRequest(**{**values, **kw})


W, H = 320, 256  # the requests' size (tests.test_image_to_image.request)


def left_half_mask(height: int = H, width: int = W) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[:, : width // 2] = 255
    return mask


def test_the_blend_is_the_masked_sum_with_the_photo_noised_to_t():
    g = torch.Generator().manual_seed(fresh_seed())
    photo, noise, img = (torch.randn(2, 20, 64, generator=g) for _ in range(3))
    mask = torch.rand(1, 20, 64, generator=g).expand(2, -1, -1)
    t = float(torch.rand((), generator=g))
    blended = Inpainting(photo, noise, mask).blend(img, t)
    m, kept = mask.double(), t * noise.double() + (1 - t) * photo.double()
    assert rel_err(blended, m * img.double() + (1 - m) * kept) < 1e-6
    assert torch.equal(Inpainting(photo, noise, torch.zeros_like(mask)).blend(img, 0.0), photo)


def test_the_latent_mask_is_the_painted_share_feathered_by_one_latent_pixel():
    values = left_half_mask()
    tokens = latent_mask(values)
    grid = torch.zeros(1, 16, H // 8, W // 8)
    grid[..., : W // 16] = 1.0  # the painted latent columns
    assert tokens.shape == pack(grid).shape
    unpacked = tokens.reshape(1, H // 16, W // 16, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(grid.shape)
    column = unpacked[0, 0, 0]  # one row of the latent grid: 1, ..., 1, 2/3, 1/3, 0, ..., 0
    edge = W // 16
    assert torch.all(column[: edge - 1] == 1) and torch.all(column[edge + 1 :] == 0)
    assert column[edge - 1].item() == pytest.approx(2 / 3) and column[edge].item() == pytest.approx(1 / 3)


def outside(tokens: torch.Tensor, mask_tokens: torch.Tensor) -> torch.Tensor:
    return tokens[(mask_tokens == 0).expand_as(tokens)]


def test_outside_the_mask_each_step_follows_the_photo_and_ends_on_it(pipeline):
    image, strength = init_photo(fresh_seed() % 1000), 0.7
    wanted = request(init_image=image, mask=left_half_mask(), strength=strength)
    steps = []
    result = pipeline.generate(
        wanted, callback=lambda info: steps.append((info.t_prev, info.latents.clone()))
    )

    start = pipeline.start_image(wanted)[0]
    photo = pack(start.latents).double()
    noise = pack(get_noise(1, H, W, "cpu", torch.float32, seed=7)).double()
    schedule = get_schedule(3, (H // 16) * (W // 16))
    assert len(steps) == 3 - image_to_image_start(3, strength)
    for t, latents in steps:  # outside: t * noise + (1 - t) * photo, in float64
        expected = t * noise + (1 - t) * photo
        assert rel_err(outside(latents, start.mask), outside(expected, start.mask)) < 1e-6
    assert steps[-1][0] == schedule[-1] == 0.0
    assert torch.equal(outside(result.latents, start.mask), outside(pack(start.latents), start.mask))
    inside = start.mask == 1
    assert not torch.equal(result.latents[inside.expand_as(result.latents)], pack(start.latents)[inside])


def test_a_mask_over_everything_is_image_to_image(pipeline):
    image = init_photo(11)
    everything = np.full((H, W), 255, np.uint8)
    masked = pipeline.generate(request(init_image=image, mask=everything, strength=0.6))
    plain = pipeline.generate(request(init_image=image, strength=0.6))
    assert torch.equal(masked.latents, plain.latents)
    assert masked.metadata["mask_area"] == "100% of the image repainted"


def test_a_mask_of_another_size_is_resized_to_the_photo_and_said(pipeline):
    small = left_half_mask(32, 40)
    result = pipeline.generate(request(init_image=init_photo(12), mask=small, strength=0.6))
    assert result.metadata["mask_fit"] == "resized from 40x32 to the photo's 320x256"
    assert (
        result.metadata["mask"].startswith("sha256:")
        and result.metadata["mask_area"] == "50% of the image repainted"
    )
    fitted, note = fit_image(small, W, H)
    assert fitted.shape == (H, W) and note == "resized to 320x256"


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"mask": left_half_mask()}, "A mask needs a photo to start from"),
        ({"init_image": init_photo(1), "mask": np.zeros((H, W), np.uint8)}, "The mask is empty"),
        ({"init_image": init_photo(1), "mask": "mask.png"}, "The mask must be an image"),
        ({"init_image": init_photo(1), "mask": np.ones((H, W), np.float32)}, "The mask must be an image"),
        ({"repaint": "face"}, "Repainting the face needs a photo to start from"),
        ({"init_image": init_photo(1), "mask": left_half_mask(), "repaint": "face"}, "not both"),
        (
            {"init_image": np.full((H, W, 3), 90, np.uint8), "repaint": "face"},
            "No face was found in the photo",
        ),
    ],
)
def test_bad_masks_are_refused_with_what_to_do(pipeline, kw, message):
    with pytest.raises(InvalidRequestError, match=message):
        pipeline.generate(request(**kw))


def test_colour_and_alpha_masks_read_as_painted_where_bright_or_opaque():
    from pulid.request import mask_values

    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)  # red paint repaints
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[1, 1, 3] = 255  # an opaque stroke on a transparent layer
    assert mask_values(rgb)[0, 0] == 255 and mask_values(rgb).sum() == 255
    assert mask_values(rgba)[1, 1] == 255 and mask_values(rgba).sum() == 255
    assert mask_values(np.eye(4, dtype=bool)).tolist()[0] == [255, 0, 0, 0]
    request(init_image=init_photo(1), mask=rgba).checked()


def test_repainting_the_face_keeps_everything_outside_its_grown_box(pipeline):
    wanted = request(init_image=init_photo(13), repaint="face", strength=1.0)
    result = pipeline.generate(wanted)
    expected = np.zeros((H, W), np.uint8)  # the stand-in's box (128, 76.8)-(192, 153.6), grown by 1/4
    expected[57:173, 112:208] = 255
    face = pipeline.face_mask(wanted.init_image)
    assert np.array_equal(face, expected)
    start = pipeline.start_image(wanted)[0]
    assert torch.equal(start.mask, latent_mask(expected))
    assert torch.equal(outside(result.latents, start.mask), outside(pack(start.latents), start.mask))
    assert result.metadata["repaint"] == "face" and result.metadata["mask_area"].endswith("repainted")


def test_the_service_repaints_the_face_of_an_uploaded_photo(uploading_service, pipeline):
    """The app hands the photo to start from over as an upload the service reads at the job's
    turn: "repaint the face" must see it coming, not refuse the request for lacking a photo."""
    from PIL import Image

    from pulid.outputs import read_image_metadata

    svc, uploads = uploading_service
    path = uploads / "face-start.png"
    Image.fromarray(init_photo(14)).save(path)
    settings = {"prompt": "a portrait of a woman", "width": W, "height": H, "num_steps": 2, "seed": 7}
    result = svc.run(GenerationRequest.from_values(repaint="face", init_image=ImageFile(path), **settings))
    assert read_image_metadata(result.path)["repaint"] == "face"


# ---------------------------------------------------------------- a mask painted in the page


def png_bytes(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_painted_layers_give_their_opacity_and_their_union_is_the_mask():
    from pulid.images import painted_layer
    from pulid.request import painted_mask

    strokes = np.zeros((40, 60, 4), np.uint8)
    strokes[5:15, 10:30] = (255, 255, 255, 255)
    strokes[20:25, 40:50, 3] = 100  # faint: under the 128 that repaints
    layer = painted_layer(png_bytes(strokes), "the painting")
    assert np.array_equal(layer, strokes)
    other = np.zeros((20, 30, 4), np.uint8)  # another layer at half the size: resized to the first
    other[10:20, 0:5] = 255
    union = painted_mask([layer, other])
    assert union[5:15, 10:30].min() == 255 and union[20:40, 0:10].min() == 255
    assert (union >= 128).sum() == 10 * 20 + 20 * 10
    faint_only = np.zeros((40, 60, 4), np.uint8)
    faint_only[:5, :, 3] = 100
    assert painted_mask([faint_only]) is None and painted_mask([]) is None
    grey = np.full((8, 8, 3), 200, np.uint8)  # a layer without transparency: its brightest channel
    assert painted_layer(png_bytes(grey), "x")[..., 3].min() == 200


def test_painted_layers_are_bounded_before_anything_is_decoded():
    from pulid.images import ImageError, painted_layer
    from pulid.limits import MAX_UPLOAD_BYTES

    with pytest.raises(ImageError, match="larger than"):
        painted_layer(b"\0" * (MAX_UPLOAD_BYTES + 1), "the drawn mask")
    with pytest.raises(ImageError, match="Could not read the drawn mask"):
        painted_layer(b"not a png", "the drawn mask")
    huge = bytearray(png_bytes(np.zeros((1, 1), np.uint8)))
    huge[16:24] = (100_000).to_bytes(4, "big") * 2  # the header says 100,000 x 100,000 pixels
    huge[29:33] = zlib.crc32(bytes(huge[12:29])).to_bytes(4, "big")  # with a valid checksum
    with pytest.raises(ImageError, match="megapixels"):
        painted_layer(bytes(huge), "the drawn mask")


def test_a_painting_over_a_large_photo_is_read_at_a_bounded_size_with_its_own_colours():
    from pulid.images import MAX_PAINTED_SIDE, painted_layer

    strokes = np.zeros((3000, 5000, 4), np.uint8)  # a flat 15 MP layer: a small file
    strokes[:, :2500] = (230, 25, 75, 255)
    strokes[1500:, 4000:] = (60, 180, 75, 200)
    layer = painted_layer(png_bytes(strokes), "the painting")
    assert layer.shape == (round(MAX_PAINTED_SIDE * 3000 / 5000), MAX_PAINTED_SIDE, 4)
    colours = {tuple(c) for c in layer.reshape(-1, 4)}
    assert colours == {(0, 0, 0, 0), (230, 25, 75, 255), (60, 180, 75, 200)}  # no blends at the edges
    assert (
        layer[:, : MAX_PAINTED_SIDE // 2 - 1, 0].min() == 230
        and layer[:, MAX_PAINTED_SIDE // 2 + 1 :, 0].max() < 230
    )


def test_an_uploaded_mask_is_read_by_its_transparency_else_its_brightness(tmp_path):
    from PIL import Image

    from pulid.serve.uploads import load_mask

    def saved(pixels: np.ndarray, mode: str) -> str:
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.png"
        Image.fromarray(pixels, mode).save(path)
        return str(path)

    strokes = np.zeros((8, 8, 4), np.uint8)
    strokes[2:4, :, :] = (10, 10, 10, 255)  # dark strokes on a transparent layer: their opacity
    transparent_white = np.full((8, 8, 4), (255, 255, 255, 0), np.uint8)
    opaque = np.zeros((8, 8, 4), np.uint8)
    opaque[..., 3] = 255
    opaque[5:, :, :3] = 255  # a black and white export that kept an alpha channel
    grey_alpha = np.zeros((8, 8, 2), np.uint8)
    grey_alpha[:, :3] = (255, 200)
    assert np.array_equal(load_mask(saved(strokes, "RGBA")), strokes[..., 3])
    assert load_mask(saved(transparent_white, "RGBA")).max() == 0  # nothing painted, though white
    assert np.array_equal(load_mask(saved(opaque, "RGBA")), opaque[..., 0])
    assert np.array_equal(load_mask(saved(grey_alpha, "LA")), grey_alpha[..., 1])
    grey = np.zeros((8, 8), np.uint8)
    grey[:, 6:] = 255
    assert np.array_equal(load_mask(saved(grey, "L")), grey)
