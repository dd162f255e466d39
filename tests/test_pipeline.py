"""The generation API on the tiny pipeline: requests in, images, seeds and metadata out."""

import numpy as np
import pytest
import torch

from flux.sampling import GenerationCancelled
from pulid.request import GenerationRequest, InvalidRequestError
from tests.stubs import photo


def request(**kw):
    return GenerationRequest(
        **{"prompt": "a portrait of a woman", "width": 256, "height": 256, "num_steps": 3, "seed": 7, **kw}
    )


def test_same_seed_same_image_and_metadata(pipeline):
    a = pipeline.generate(request(id_images=[photo(1)]))
    b = pipeline.generate(request(id_images=[photo(1)]))
    assert a.image.size == (256, 256) and a.image.mode == "RGB"
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.seed == 7 and a.metadata["seed"] == 7 and a.metadata["prompt"] == "a portrait of a woman"
    assert a.metadata["num_id_images"] == 1 and a.metadata["model"] == "tiny-random"
    assert a.latents.shape == (1, 256, 64)


def test_random_seed_is_reported(pipeline):
    result = pipeline.generate(request(seed=-1))
    again = pipeline.generate(request(seed=result.seed))
    assert result.seed >= 0 and torch.equal(result.latents, again.latents)


def test_identity_changes_the_image_and_weight_zero_removes_it(pipeline):
    plain = pipeline.generate(request())
    with_id = pipeline.generate(request(id_images=[photo(1)]))
    other_id = pipeline.generate(request(id_images=[photo(2)]))
    zero = pipeline.generate(request(id_images=[photo(1)], id_weight=0.0))
    late = pipeline.generate(request(id_images=[photo(1)], start_step=3))  # after the last step: no ID
    assert not torch.equal(with_id.latents, plain.latents)
    assert not torch.equal(with_id.latents, other_id.latents)
    assert torch.equal(zero.latents, plain.latents)
    assert torch.equal(late.latents, plain.latents)
    assert "the face was not used" in late.metadata["id_not_used"] and "id_not_used" not in with_id.metadata


def test_several_photos_average_their_id_tokens(pipeline):
    enc = pipeline.id_encoder
    one, two = enc([photo(3)]).tokens, enc([photo(4)]).tokens
    both = enc([photo(3), photo(4)]).tokens
    assert torch.allclose(both, (one + two) / 2)


def test_seen_photos_are_cached(pipeline):
    """The same pixels are analysed once (the result itself comes back; a count of the analyser's
    calls was thrown off by a job of another test still running on the shared pipeline)."""
    encoder = pipeline.id_encoder
    first = encoder.encode_one(photo(5))
    assert encoder.encode_one(photo(5).copy()) is first
    assert encoder.encode_one(photo(6)) is not first
    encoder.forget()
    assert encoder.encode_one(photo(5)) is not first


def test_true_cfg_uses_negative_prompt_and_unconditional_id(pipeline):
    fake = pipeline.generate(request(id_images=[photo(1)]))
    cfg = pipeline.generate(request(id_images=[photo(1)], true_cfg=3.0, neg_prompt="snow"))
    cfg_other_neg = pipeline.generate(request(id_images=[photo(1)], true_cfg=3.0, neg_prompt="color"))
    assert not torch.equal(fake.latents, cfg.latents)
    assert not torch.equal(cfg.latents, cfg_other_neg.latents)
    uncond = pipeline.id_encoder([photo(1)], with_uncond=True).uncond_tokens
    assert uncond is not None and uncond.shape == fake_tokens_shape(pipeline)


def fake_tokens_shape(pipeline):
    return pipeline.id_encoder([photo(1)]).tokens.shape


def test_progress_callback_and_cancel(pipeline):
    steps = []

    def cancel_at_two(info):
        steps.append(info.step)
        if info.step == 1:
            raise GenerationCancelled

    with pytest.raises(GenerationCancelled):
        pipeline.generate(request(num_steps=5), callback=cancel_at_two)
    assert steps == [0, 1]


def test_the_t5_length_is_chosen_per_request(pipeline):
    short = pipeline.generate(request(max_sequence_length=128))
    long = pipeline.generate(request(max_sequence_length=256))
    assert not torch.equal(short.latents, long.latents)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(width=250), r"Width must be a multiple of 16 from 256 to 1536 \(got 250\)"),
        (dict(height=2048), "Height must be a multiple of 16"),
        (dict(num_steps=0), "Number of steps must be a whole number from 1 to 50"),
        (dict(num_steps=2.5), r"Number of steps must be a whole number .*\(got 2.5\)"),
        (dict(id_weight=3.5), "ID weight must be a number from 0 to 3"),
        (dict(guidance=float("nan")), "Guidance must be a number"),
        (dict(seed=-2), "Seed"),
        (dict(seed=2**70), "Seed"),
        (dict(max_sequence_length=100), "T5 max sequence length must be one of 128, 256, 384, 512"),
        (dict(prompt=None, id_images=[None]), "ID photos must be a list of images"),
        (dict(prompt="x" * 2001), r"Prompt is too long \(2,001 characters; at most 2,000\)"),
    ],
)
def test_invalid_requests_are_refused_with_a_clear_message(pipeline, kw, message):
    with pytest.raises(InvalidRequestError, match=message):
        pipeline.generate(request(**kw))


def test_pipeline_models_are_not_changed_by_requests(pipeline):
    before = {k: v.clone() for k, v in pipeline.dit.state_dict().items()}
    pipeline.generate(request(id_images=[photo(1)], true_cfg=2.0))
    assert all(torch.equal(before[k], v) for k, v in pipeline.dit.state_dict().items())


def test_a_batch_gives_each_seed_the_image_it_gives_alone(pipeline):
    """Images of a batch share only the conditioning: image i has seed + i, and its latents are
    those of a run with that seed alone (float32 on the CPU: batched matmuls may differ in
    rounding, tolerance 1e-4 relative to the latents' scale)."""
    batch = pipeline.generate(request(id_images=[photo(1)], seed=40, num_images=3, true_cfg=2.0))
    assert [image.seed for image in batch.images] == [40, 41, 42]
    for image in batch.images:
        alone = pipeline.generate(request(id_images=[photo(1)], seed=image.seed, true_cfg=2.0))
        scale = alone.latents.abs().max().item()
        assert torch.allclose(image.latents, alone.latents, atol=1e-4 * scale, rtol=0)
        assert image.metadata["seed"] == image.seed and image.metadata["num_images"] == 3
    assert not torch.allclose(batch.images[0].latents, batch.images[1].latents)


def test_seeds_wrap_past_the_largest_seed():
    from pulid.request import MAX_SEED

    assert request(num_images=3).seeds(MAX_SEED - 1) == [MAX_SEED - 1, MAX_SEED, 0]


def test_each_image_reaches_on_image_as_it_is_decoded(pipeline):
    order = []
    result = pipeline.generate(
        request(seed=3, num_images=2),
        on_stage=lambda name: order.append(name) if name != "decoding" or order[-1] != name else None,
        on_image=lambda image: order.append(image.seed),
    )
    assert order == ["encoding the prompt", "decoding", 3, "decoding", 4]
    assert [image.seed for image in result.images] == [3, 4]


def test_face_similarity_is_the_mean_arcface_cosine_to_the_references(pipeline):
    """Checked against an independent float64 computation from the stub's embeddings."""
    analysis = pipeline.id_encoder.face_analyzer
    photos = [photo(1), photo(2)]
    result = pipeline.generate(request(id_images=photos, seed=8))
    found = analysis.identity(np.asarray(result.image)).astype(np.float64)
    references = [analysis.analyze(p).arcface_embedding.astype(np.float64) for p in photos]
    expected = np.mean([r @ found / np.sqrt((r @ r) * (found @ found)) for r in references])
    assert abs(result.images[0].face_similarity - expected) < 1e-9
    assert result.metadata["face_similarity"] == f"{expected:.2f}"


def test_face_similarity_says_when_there_is_no_face_or_no_photo(pipeline, monkeypatch):
    from pulid.similarity import NO_FACE_FOUND, NO_ID_PHOTO

    plain = pipeline.generate(request(seed=2))
    assert plain.images[0].face_similarity is None and plain.metadata["face_similarity"] == NO_ID_PHOTO
    monkeypatch.setattr(pipeline.id_encoder.face_analyzer, "identity", lambda image: None)
    faceless = pipeline.generate(request(id_images=[photo(1)], seed=2))
    assert faceless.images[0].face_similarity is None
    assert faceless.metadata["face_similarity"] == NO_FACE_FOUND
