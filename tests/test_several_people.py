"""Several people in one image: each identity's ID reaches only the image tokens of its region.

At every insertion point each identity's cross-attention output is multiplied by its region (per
image token) and the products are summed. Checked against float64 computations of that masked sum
(in the DiT and through the whole tiny pipeline), plus: one identity over the whole image is the
single-ID path bit for bit, an identity adds nothing outside its region, the preset columns, and
the refusals through every door (request, pipeline, service, API, CLI).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from flux.sampling import get_noise, get_schedule, image_ids, pack
from pulid.injection import Identity, PuLIDInjection
from pulid.regions import column_regions, overlap_share, token_region
from pulid.request import GenerationRequest, InvalidRequestError, Person
from tests.numerics import fresh_seed, rel_err
from tests.reference_flux import flux_forward
from tests.stubs import photo
from tests.tiny_configs import tiny_flux_params
from tests.tiny_models import DIT_TOL_F64, random_inputs, random_model, tiny_ca_modules

W, H = 320, 256  # the requests' size: 20 x 16 image tokens
TOL_PIPELINE = 1e-4  # the float32 tiny pipeline against the float64 reference


def request(**kw) -> GenerationRequest:
    values = {"prompt": "two friends", "width": W, "height": H, "num_steps": 3, "seed": 7}
    return GenerationRequest(**{**values, **kw})


def region(left: int, right: int, top: int = 0, bottom: int = H) -> np.ndarray:
    values = np.zeros((H, W), np.uint8)
    values[top:bottom, left:right] = 255
    return values


# ---------------------------------------------------------------- the injection


def soft_regions(tokens: int, count: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Random regions in [0, 1] with exact zeros: they overlap in places and leave tokens out."""
    regions = []
    for _ in range(count):
        values = torch.rand(1, tokens, 1, generator=generator, dtype=torch.float64)
        regions.append(torch.where(values < 0.4, torch.zeros_like(values), values))
    return regions


@pytest.mark.parametrize("make", [Identity, Identity.within], ids=["every token", "region's tokens"])
def test_two_and_four_identities_match_the_float64_masked_sum(make):
    """Both ways of computing an identity's part: its cross-attention over every token times the
    region, and over the tokens its region reaches only (added back in place)."""
    params = tiny_flux_params()
    model = random_model(params)
    cas = tiny_ca_modules(params)
    inputs = random_inputs(params, batch=1)
    g = torch.Generator().manual_seed(fresh_seed())
    for count in (2, 4):
        tokens = [torch.randn(1, 6, 48, generator=g, dtype=torch.float64) for _ in range(count)]
        weights = [0.3 + float(torch.rand((), generator=g)) for _ in range(count)]
        regions = soft_regions(inputs["img"].shape[1], count, g)
        identities = [make(t, w, r) for t, w, r in zip(tokens, weights, regions, strict=True)]
        assert all((i.index is not None) == (make == Identity.within) for i in identities)
        injection = PuLIDInjection(cas, identities, params.depth, params.depth_single_blocks)
        with torch.no_grad():
            out = model(**inputs, id_injection=injection)

            def masked_sum(kind, index, img, tokens=tokens, weights=weights, regions=regions):
                interval = 2 if kind == "double" else 4
                if index % interval:
                    return None
                ca = cas[index // 2] if kind == "double" else cas[1 + index // 4]
                return sum(w * r * ca(t, img) for t, w, r in zip(tokens, weights, regions, strict=True))

            ref = flux_forward(model.state_dict(), params, **inputs, residual_fn=masked_sum)
        assert rel_err(out, ref) < DIT_TOL_F64, count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_identity_over_every_token_is_the_single_id_path_bit_for_bit(dtype):
    params = tiny_flux_params()
    model = random_model(params, dtype)
    cas = tiny_ca_modules(params, dtype)
    inputs = random_inputs(params, batch=1, dtype=dtype)
    tokens = torch.randn(1, 6, 48, dtype=dtype)
    everywhere = torch.ones(1, inputs["img"].shape[1], 1, dtype=dtype)
    depths = params.depth, params.depth_single_blocks
    with torch.no_grad():
        single = model(**inputs, id_injection=PuLIDInjection(cas, [Identity(tokens, 0.9)], *depths))
        regional = model(
            **inputs, id_injection=PuLIDInjection(cas, [Identity(tokens, 0.9, everywhere)], *depths)
        )
    assert torch.equal(single, regional)


@pytest.mark.parametrize("make", [Identity, Identity.within], ids=["every token", "region's tokens"])
def test_an_identity_adds_nothing_outside_its_region(make):
    """Tokens outside region i get exactly nothing from identity i at any insertion point: where
    only identity B's region reaches, the residual is B's alone, bit for bit; outside both, 0."""
    params = tiny_flux_params()
    cas = tiny_ca_modules(params, torch.float32)
    g = torch.Generator().manual_seed(fresh_seed())
    img = torch.randn(1, 48, 64, generator=g)
    a, b = torch.randn(1, 6, 48, generator=g), torch.randn(1, 6, 48, generator=g)
    left, right = torch.zeros(1, 48, 1), torch.zeros(1, 48, 1)
    left[:, :20], right[:, 20:40] = 1.0, torch.rand(1, 20, 1, generator=g) + 0.1  # 40-47: nobody's
    depths = params.depth, params.depth_single_blocks
    both = PuLIDInjection(cas, [make(a, 1.2, left), make(b, 0.7, right)], *depths)
    only_b = PuLIDInjection(cas, [make(b, 0.7, right)], *depths)
    for kind, index in (("double", 0), ("single", 0)):
        step = f"after_{kind}_block"
        together, alone = getattr(both, step)(index, img), getattr(only_b, step)(index, img)
        assert torch.equal(together[:, 20:40], alone[:, 20:40])
        assert torch.all(together[:, 40:] == 0) and torch.all(alone[:, :20] == 0)
        assert not torch.equal(together[:, :20], torch.zeros_like(together[:, :20]))


def test_a_region_reaching_most_tokens_is_not_gathered_and_gathers_pad_to_the_bucket():
    from pulid.injection import GATHER_BELOW, TOKEN_BUCKET

    tokens = torch.zeros(1, 4, 8)
    most = torch.ones(1, 1000, 1)
    most[:, : int(1000 * (1 - GATHER_BELOW))] = 0
    assert Identity.within(tokens, 1.0, most).index is None
    some = torch.zeros(1, 1000, 1)
    some[:, 100:400] = 0.5
    gathered = Identity.within(tokens, 1.0, some)
    assert gathered.index.numel() % TOKEN_BUCKET == 0 and gathered.index.numel() >= 300
    assert torch.equal(gathered.index[:300], torch.arange(100, 400))
    assert torch.all(gathered.index[300:] == 0) and torch.all(gathered.factors[:, 300:] == 0)
    assert Identity.within(tokens, 1.0, None).region is None


def test_painted_regions_go_to_the_person_of_the_nearest_brush_colour():
    from pulid.regions import PALETTE, painted_regions

    layer = np.zeros((20, 40, 4), np.uint8)
    layer[:, :10] = (*PALETTE[0], 255)
    layer[:, 10:20] = (*(c - 20 for c in PALETTE[2]), 255)  # an anti-aliased blue: still person 3
    layer[:5, 30:] = (*PALETTE[0], 90)  # faint: nobody's
    later = np.zeros((20, 40, 4), np.uint8)
    later[:, 5:10] = (*PALETTE[3], 255)  # painted over person 1's strip: person 4 there
    regions = painted_regions([layer, later], 4)
    assert (regions[0] > 0).sum() == 20 * 5 and regions[1] is None
    assert (regions[2] > 0).sum() == 20 * 10 and (regions[3] > 0).sum() == 20 * 5
    assert painted_regions([], 2) == [None, None]


def test_columns_split_the_image_left_to_right_and_share_split_tokens():
    for count in (2, 3, 4):
        columns = column_regions(count, W, H)
        assert np.all(sum(c.astype(int) for c in columns) == 255)  # every pixel in exactly one
        lefts = [int(np.argmax(c[0] > 0)) for c in columns]
        assert lefts == sorted(lefts) and lefts[0] == 0
        shares = torch.stack([token_region(c) for c in columns])
        assert torch.allclose(shares.sum(dim=0), torch.ones(1, (H // 16) * (W // 16), 1), atol=0, rtol=0)
        assert overlap_share(list(shares)) == 0.0
    third = token_region(column_regions(3, W, H)[0]).reshape(H // 16, W // 16)
    # 320 / 3 = 106.67 -> the first column ends at pixel 107, inside token 6 (pixels 96-111)
    assert torch.all(third[:, :6] == 1) and torch.all(third[:, 7:] == 0)
    assert third[0, 6].item() == pytest.approx(11 / 16)


# ---------------------------------------------------------------- through the pipeline


def test_two_people_in_columns_match_the_float64_step(pipeline):
    first, second = photo(fresh_seed() % 1000), photo(5)
    wanted = request(id_images=[first], id_weight=0.9, more_people=(Person((second,), 1.3),), num_steps=1)
    result = pipeline.generate(wanted)

    noise = get_noise(1, H, W, "cpu", torch.float32, seed=7).double()
    t, t_next = get_schedule(1, (H // 16) * (W // 16))
    cond = pipeline.encode_prompt("two friends", 128)
    tokens = [pipeline.id_encoder([face]).tokens.double() for face in (first, second)]
    columns = [token_region(c).double() for c in column_regions(2, W, H)]
    cas = [copy.deepcopy(ca).double() for ca in pipeline.pulid_ca]  # float64 copies of the product's
    num_double = (pipeline.dit.params.depth + 1) // 2

    def masked_sum(kind, index, img):
        interval = 2 if kind == "double" else 4
        if index % interval:
            return None
        ca = cas[index // 2] if kind == "double" else cas[num_double + index // 4]
        return sum(w * r * ca(tok, img) for tok, w, r in zip(tokens, (0.9, 1.3), columns, strict=True))

    pred = flux_forward(
        pipeline.dit.state_dict(),
        pipeline.dit.params,
        img=pack(noise),
        img_ids=image_ids(1, H // 8, W // 8).double(),
        txt=cond.txt.double(),
        txt_ids=cond.txt_ids.double(),
        timesteps=torch.full((1,), t, dtype=torch.float64),
        y=cond.vec.double(),
        guidance=torch.full((1,), 4.0, dtype=torch.float64),
        residual_fn=masked_sum,
    )
    assert rel_err(result.latents, pack(noise) + (t_next - t) * pred) < TOL_PIPELINE
    single = pipeline.generate(request(id_images=[first], id_weight=0.9, num_steps=1))
    assert not torch.equal(result.latents, single.latents)


def test_one_person_over_the_whole_image_is_the_single_person_image(pipeline):
    face = photo(8)
    single = pipeline.generate(request(id_images=[face]))
    whole = pipeline.generate(request(id_images=[face], layout="masks", id_region=region(0, W)))
    assert torch.equal(single.latents, whole.latents)
    assert whole.metadata["people"] == [
        {"photos": 1, "weight": 1.0, "region": whole.metadata["people"][0]["region"]}
    ]
    assert "people" not in single.metadata
    unpainted = pipeline.generate(request(id_images=[face], layout="masks"))  # 'masks', nothing drawn
    assert torch.equal(single.latents, unpainted.latents)


def test_a_regional_person_leaves_other_regions_alone_in_the_first_block(pipeline):
    """One person on the left half: the injected residual is zero on the right (at the first
    insertion point, before self-attention spreads anything)."""
    wanted = request(id_images=[photo(2)], layout="masks", id_region=region(0, W // 2))
    people = pipeline.people(wanted.checked(), {})
    (person,) = people
    img = torch.randn(1, (H // 16) * (W // 16), pipeline.dit.hidden_size)
    injection = pipeline.injection([person.identity])
    with torch.inference_mode():
        residual = injection.after_double_block(0, img).reshape(H // 16, W // 16, -1)
    assert torch.all(residual[:, W // 32 :] == 0) and torch.all(residual[:, : W // 32].abs().sum(-1) > 0)
    assert person.box == (0, 0, W // 2, H)


def test_people_metadata_overlap_and_per_person_likeness(pipeline):
    faces = [photo(10), photo(11), photo(12)]
    more = (Person((faces[1],), 0.5, region(100, 220)), Person((faces[2],), 1.0, region(200, W)))
    result = pipeline.generate(
        request(id_images=[faces[0]], layout="masks", id_region=region(0, 120), more_people=more)
    )
    people = result.metadata["people"]
    assert [p["weight"] for p in people] == [1.0, 0.5, 1.0] and all(
        p["region"].startswith("sha256:") for p in people
    )
    assert "regions_overlap" in result.metadata  # 100-120 and 200-220 belong to two people each
    scores = result.metadata["face_similarity"].split(" / ")
    assert len(scores) == 3 and all(float(s) == pytest.approx(float(s)) for s in scores)
    assert result.images[0].face_similarity == pytest.approx(min(float(s) for s in scores), abs=0.005)

    columns = pipeline.generate(request(id_images=[faces[0]], more_people=(Person((faces[1],)),)))
    assert [p["region"] for p in columns.metadata["people"]] == ["column 1 of 2", "column 2 of 2"]
    assert "regions_overlap" not in columns.metadata


def test_a_region_drawn_at_another_size_is_fitted_and_said(pipeline):
    small = np.zeros((64, 80), np.uint8)
    small[:, :40] = 255
    result = pipeline.generate(
        request(
            id_images=[photo(3)],
            layout="masks",
            id_region=small,
            more_people=(Person((photo(4),), 1.0, 255 - small),),
        )
    )
    assert result.metadata["region_1_fit"] == "resized to 320x256"
    assert result.metadata["region_2_fit"] == "resized to 320x256"


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"more_people": tuple(Person((photo(i),)) for i in range(4))}, "5 people were given; at most 4"),
        ({"more_people": (Person(()),)}, "Person 2 has no photo"),
        (
            {"more_people": (Person((photo(1),), 1.0, region(0, 50)),)},
            "Regions are used with the 'masks' layout",
        ),
        (
            {"layout": "masks", "id_region": region(0, 50), "more_people": (Person((photo(1),)),)},
            "Person 2 has no region",
        ),
        (
            {"layout": "masks", "id_region": np.zeros((H, W), np.uint8)},
            "Person 1's region must be an image that paints",
        ),
        ({"more_people": (Person(("me.jpg",)),)}, "Person 2's photos must be a list of RGB images"),
        ({"more_people": (Person((photo(1),), 9.0),)}, "ID weight must be a number from 0 to 3"),
        ({"more_people": [object()]}, "Person 2 must be given as"),
    ],
)
def test_bad_people_are_refused_with_what_to_do(pipeline, kw, message):
    with pytest.raises(InvalidRequestError, match=message):
        pipeline.generate(request(id_images=[photo(1)], **kw))


def test_each_person_has_at_most_the_photo_limit_through_every_front_door():
    """The limit is the request's own (the Python API, the CLI and the HTTP endpoint share it), not
    only the app service's: five photos of a person are used, six are refused before any work."""
    five = [photo(i) for i in range(5)]
    six = five + [photo(5)]
    GenerationRequest(prompt="p", id_images=five, more_people=(Person(tuple(five)),)).checked()
    with pytest.raises(InvalidRequestError, match="5 extra photos were sent; at most 4 can be used"):
        GenerationRequest(prompt="p", id_images=six).checked()
    with pytest.raises(InvalidRequestError, match="Person 2 has 6 photos; at most 5 are used"):
        GenerationRequest(prompt="p", id_images=five, more_people=(Person(tuple(six)),)).checked()


def test_people_without_a_first_photo_or_with_a_tiny_region_are_refused(pipeline):
    with pytest.raises(InvalidRequestError, match="Person 1 has no photo"):
        pipeline.generate(request(more_people=(Person((photo(1),)),)))
    with pytest.raises(InvalidRequestError, match="Person 2's region is too small to hold a face"):
        pipeline.generate(
            request(
                id_images=[photo(1)],
                layout="masks",
                id_region=region(0, 160),
                more_people=(Person((photo(2),), 1.0, region(200, 216, 0, 16)),),
            )
        )


# ---------------------------------------------------------------- through the service


def test_the_service_reads_uploaded_people_and_regions(uploading_service, pipeline):
    """People and regions come as files in the request; the service checks each came from its
    upload folder and reads them at the job's turn. Requests built in Python without
    ``from_values`` are checked by the service as a whole."""
    from PIL import Image

    from pulid.images import ImageFile
    from pulid.outputs import read_image_metadata
    from pulid.serve.service import ServiceError

    svc, uploads = uploading_service
    files = {}
    for name, pixels in {
        "p1": photo(20),
        "p2": photo(21),
        "r1": region(0, 160),
        "r2": region(160, W),
    }.items():
        Image.fromarray(pixels).save(uploads / f"{name}.png")
        files[name] = ImageFile(uploads / f"{name}.png")
    settings = {"prompt": "two friends", "width": W, "height": H, "num_steps": 2, "seed": 7}
    sent = GenerationRequest.from_values(
        layout="masks",
        id_images=[files["p1"]],
        more_people=[Person((files["p2"],), "0.6", files["r2"])],
        id_region=files["r1"],
        **settings,
    )
    result = svc.run(sent)
    people = read_image_metadata(result.path)["people"]
    assert [p["weight"] for p in people] == [1.0, 0.6] and people[1]["region"].startswith("sha256:")
    direct = pipeline.generate(
        GenerationRequest.from_values(
            layout="masks",
            id_images=[photo(20)],
            more_people=[Person((photo(21),), 0.6, region(160, W))],
            id_region=region(0, 160),
            **settings,
        )
    )
    assert np.array_equal(np.asarray(Image.open(result.path).convert("RGB")), np.asarray(direct.image))

    outside = uploads.parent / "elsewhere.png"
    Image.fromarray(region(0, 100)).save(outside)
    masks = {"layout": "masks", "id_region": files["r1"]}
    refusals = [
        (
            {**masks, "more_people": (Person((files["p2"],), 1.0, ImageFile(outside)),)},
            "was not uploaded to this app",
        ),
        ({"more_people": (Person((files["p2"],)),) * 4}, "at most 4"),
        ({"more_people": (Person((files["p2"],), "lots"),)}, "ID weight must be"),
        ({"more_people": (Person((files["p2"],)),), "id_region": files["r1"]}, "'masks' layout"),
        ({**masks, "more_people": (Person((files["p2"],)),)}, "Person 2 has no region"),
    ]
    for kw, message in refusals:
        with pytest.raises(ServiceError, match=message):
            svc.run(GenerationRequest(id_images=[files["p1"]], **{**settings, **kw}))


def test_the_progress_bar_only_moves_forward_through_every_stage(uploading_service):
    """Each stage a request reports (several people, from a photo) is one the app places, so the
    bar goes forward from start to saving and never jumps back to the start mid-request."""
    from pulid import stages

    service, _ = uploading_service

    def run(**kw) -> tuple[list[float], list[str], list]:
        bar, fills, names, steps = stages.RequestProgress(), [], [], []

        def progress(info) -> None:
            if isinstance(info, str):
                names.append(info)
                assert info in stages.PROGRESS, f"stage {info!r} is not declared in pulid.stages"
            elif hasattr(info, "step"):
                steps.append((info.step, info.total))
            else:
                return  # a saved image
            if (shown := bar.update(info)) is not None:
                fills.append(shown[0])

        service.run(request(**kw), progress=progress)
        return fills, names, steps

    fills, names, _ = run(
        id_images=[photo(1)], more_people=(Person((photo(2),)),), init_image=photo(3)[:H, :W].copy()
    )
    assert fills == sorted(fills) and fills[-1] == stages.PROGRESS[stages.SAVING]
    for expected in (stages.READING_FACES, stages.ENCODING_PHOTO, stages.DECODING, stages.MEASURING_LIKENESS):
        assert expected in names
    # two images made in turn (the step cache does one at a time): steps count the whole request
    fills, names, steps = run(id_images=[photo(1)], num_images=2, cache_threshold=0.3)
    assert steps == [(step, 6) for step in range(6)]  # 3 steps an image
    assert names.count(stages.SAVING) == 2 and fills == sorted(fills)
    assert fills[-1] == stages.PROGRESS[stages.SAVING]


def test_painted_regions_match_an_argmin_over_all_colours_and_stay_small_in_memory():
    import tracemalloc

    from pulid.regions import PALETTE, painted_regions

    rng = np.random.default_rng(fresh_seed())
    layers = [rng.integers(0, 256, (96, 80, 4), dtype=np.uint8) for _ in range(2)]
    owner = np.full((96, 80), -1)
    for layer in layers:  # the reference: every colour's distance at once, in int64
        distance = ((layer[..., None, :3].astype(np.int64) - np.asarray(PALETTE)) ** 2).sum(-1)
        owner = np.where(layer[..., 3] >= 128, distance.argmin(-1), owner)
    for person, region in enumerate(painted_regions(layers, len(PALETTE))):
        expected = owner == person
        assert (region is None and not expected.any()) or np.array_equal(region == 255, expected)
    big = np.zeros((2048, 2048, 4), np.uint8)
    big[..., :] = (*PALETTE[1], 255)
    tracemalloc.start()
    try:
        painted_regions([big], len(PALETTE))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 24 * big.shape[0] * big.shape[1]  # bytes a pixel; every colour at once took 96+
