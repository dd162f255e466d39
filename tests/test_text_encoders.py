"""T5 and CLIP prompt encoders through transformers, on tiny models saved to local folders."""

import pytest
import torch

from flux.checkpoint import CheckpointError
from flux.text_encoders import load_clip, load_t5
from tiny_random.models import (
    TINY_CLIP_CONFIG,
    TINY_CLIP_DIM,
    TINY_T5_CONFIG,
    TINY_T5_DIM,
    write_tiny_clip,
    write_tiny_t5,
)


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    return write_tiny_t5(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


def padded_ids(tokenizer, prompt, length):
    ids = tokenizer(prompt)["input_ids"]
    return torch.tensor([ids + [tokenizer.pad_token_id] * (length - len(ids))])


def test_t5_pads_to_the_requested_length_without_mask(t5_folder):
    t5 = load_t5(t5_folder, "cpu", torch.float32, max_length=16, expected=TINY_T5_CONFIG)
    prompt = "a photo of a woman"
    out16 = t5([prompt])
    out24 = t5([prompt], max_length=24)
    assert out16.shape == (1, 16, TINY_T5_DIM) and out24.shape == (1, 24, TINY_T5_DIM)
    with torch.no_grad():
        expected = t5.hf_module(input_ids=padded_ids(t5.tokenizer, prompt, 24)).last_hidden_state
    assert torch.allclose(out24, expected, atol=1e-6)
    # No attention mask, as in the official encoder: the padding changes the prompt tokens' features.
    assert not torch.allclose(out16[:, :5], out24[:, :5], atol=1e-4)


def test_t5_loads_in_bf16_and_truncates(t5_folder):
    t5 = load_t5(t5_folder, "cpu", torch.bfloat16, max_length=4, expected=TINY_T5_CONFIG)
    out = t5(["a photo of a woman in snow in color"])
    assert out.shape == (1, 4, TINY_T5_DIM) and out.dtype == torch.bfloat16


def test_clip_returns_the_pooled_vector(clip_folder):
    clip = load_clip(clip_folder, "cpu", torch.float32, expected=TINY_CLIP_CONFIG)
    prompt = "portrait cinematic color"
    pooled = clip([prompt, "a man"])
    assert pooled.shape == (2, TINY_CLIP_DIM)
    with torch.no_grad():
        expected = clip.hf_module(input_ids=padded_ids(clip.tokenizer, prompt, 77)).pooler_output
    assert torch.allclose(pooled[:1], expected, atol=1e-6)


def test_a_folder_that_is_not_the_expected_encoder_is_refused(t5_folder, clip_folder):
    # The real loaders expect T5-XXL and CLIP-L: a small model's folder must not load silently.
    with pytest.raises(
        CheckpointError, match=r"is not the T5-XXL text encoder: .*d_model = 24 \(expected 4096\)"
    ):
        load_t5(t5_folder, "cpu")
    with pytest.raises(CheckpointError, match=r"hidden_size = 16 \(expected 768\)") as err:
        load_clip(clip_folder, "cpu")
    assert str(clip_folder) in str(err.value)


def test_clip_folder_with_the_whole_clip_model_loads_and_missing_weights_are_named(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import CLIPConfig, CLIPModel

    folder = write_tiny_clip(tmp_path / "clip")  # tokenizer and text model
    config = CLIPConfig(
        text_config={**TINY_CLIP_CONFIG, "vocab_size": 64, "projection_dim": 8},
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
            projection_dim=8,
        ),
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(folder)  # as the hub repo: text and vision weights in one file
    clip = load_clip(folder, "cpu", torch.float32, expected=TINY_CLIP_CONFIG)
    assert clip(["a photo"]).shape == (1, TINY_CLIP_DIM)

    weights = folder / "model.safetensors"
    state = load_file(weights)
    dropped = "text_model.final_layer_norm.weight"
    del state[dropped]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing weight") as err:
        load_clip(folder, "cpu", torch.float32, expected=TINY_CLIP_CONFIG)
    assert "final_layer_norm.weight" in str(err.value) and str(folder) in str(err.value)


def test_an_incomplete_folder_is_an_error_naming_it(tmp_path, t5_folder):
    import shutil

    broken = tmp_path / "t5"
    shutil.copytree(t5_folder, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="could not be loaded as the T5-XXL text encoder") as err:
        load_t5(broken, "cpu", expected=TINY_T5_CONFIG)
    assert str(broken) in str(err.value)
