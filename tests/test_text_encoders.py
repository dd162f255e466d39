"""T5 and CLIP prompt encoders through transformers, on tiny models saved to local folders."""

import pytest
import torch

from flux.hub import WeightsNotFoundError
from flux.text_encoders import CLIP_SOURCE, load_clip, load_t5
from flux.tiny import TINY_CLIP_DIM, TINY_T5_DIM, write_tiny_clip, write_tiny_t5


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
    t5 = load_t5("cpu", torch.float32, max_length=16, path=t5_folder)
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
    t5 = load_t5("cpu", torch.bfloat16, max_length=4, path=t5_folder)
    out = t5(["a photo of a woman in snow in color"])
    assert out.shape == (1, 4, TINY_T5_DIM) and out.dtype == torch.bfloat16


def test_clip_returns_the_pooled_vector(clip_folder):
    clip = load_clip("cpu", torch.float32, path=clip_folder)
    prompt = "portrait cinematic color"
    pooled = clip([prompt, "a man"])
    assert pooled.shape == (2, TINY_CLIP_DIM)
    with torch.no_grad():
        expected = clip.hf_module(input_ids=padded_ids(clip.tokenizer, prompt, 77)).pooler_output
    assert torch.allclose(pooled[:1], expected, atol=1e-6)


def test_missing_encoder_offline_names_the_repo_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as err:
        load_clip("cpu", models_dir=tmp_path)
    assert CLIP_SOURCE.repo_id in str(err.value) and str(tmp_path / CLIP_SOURCE.local_name) in str(err.value)
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_t5("cpu", path=tmp_path / "nope")
