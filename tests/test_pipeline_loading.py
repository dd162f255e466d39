"""The full pipeline loader: every missing weight file is reported at once, before any loading."""

import pytest

from flux.hub import WeightsNotFoundError
from pulid.loading import load_pipeline


def test_all_missing_files_are_listed_in_one_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as err:
        load_pipeline("flux-dev", "v0.9.0", "cpu", models_dir=tmp_path)
    message = str(err.value)
    for name in [
        "flux1-dev.safetensors",
        "ae.safetensors",
        "pulid_flux_v0.9.0.safetensors",
        "EVA02_CLIP_L_336_psz14_s6B.pt",
    ]:
        assert name in message and str(tmp_path) in message
    assert "HF_TOKEN" in message  # the gated FLUX repo


def test_explicit_pulid_path_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as err:
        load_pipeline(
            "flux-krea-dev",
            "v0.9.1",
            "cpu",
            models_dir=tmp_path,
            pretrained_model=tmp_path / "mine.safetensors",
        )
    assert "mine.safetensors is not a file" in str(err.value)
    assert "flux1-krea-dev.safetensors" in str(err.value)


def test_unknown_model_or_version_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="flux-dev"):
        load_pipeline("flux-pro", "v0.9.1", "cpu", models_dir=tmp_path)
    with pytest.raises(ValueError, match="v0.9.1"):
        load_pipeline("flux-dev", "v2", "cpu", models_dir=tmp_path)
