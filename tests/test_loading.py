"""Strict loading of tiny checkpoints written in the official key layout, and every error path."""

import dataclasses

import httpx
import pytest
import torch
from safetensors.torch import save_file

from flux.autoencoder import AutoEncoder
from flux.checkpoint import CheckpointError
from flux.hub import WeightFile, WeightsNotFoundError, resolve_weight
from flux.loading import load_autoencoder, load_flow_model, load_flow_model_from_file
from flux.model import Flux
from flux.registry import MODELS, ModelSpec
from tests.tiny_configs import tiny_ae_params, tiny_flux_params


def tiny_spec() -> ModelSpec:
    base = MODELS["flux-dev"]
    return dataclasses.replace(
        base,
        params=tiny_flux_params(),
        ae_params=tiny_ae_params(),
        flow=dataclasses.replace(base.flow, local_name="tiny-flux.safetensors"),
        ae=dataclasses.replace(base.ae, local_name="tiny-ae.safetensors"),
    )


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A random tiny DiT saved as bf16 safetensors in the official key layout."""
    torch.manual_seed(0)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in Flux(tiny_flux_params()).state_dict().items()}
    path = tmp_path / "tiny-flux.safetensors"
    save_file(state, str(path))
    return path, state


def test_loads_every_tensor_to_target_dtype_from_models_folder(tiny_checkpoint, tmp_path):
    path, state = tiny_checkpoint
    model = load_flow_model(tiny_spec(), device="cpu", dtype=torch.bfloat16, models_dir=tmp_path)
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert all(
        p.dtype == torch.bfloat16 and not p.is_meta and not p.requires_grad for p in model.parameters()
    )


def test_cast_on_load_and_explicit_path_wins(tiny_checkpoint, tmp_path):
    path, state = tiny_checkpoint
    other = tmp_path / "elsewhere.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in state.items()}, str(other))
    model = load_flow_model(tiny_spec(), device="cpu", dtype=torch.float32, path=other, models_dir=tmp_path)
    assert all(p.dtype == torch.float32 and p.abs().sum() == 0 for p in model.parameters())


@pytest.mark.parametrize(
    "edit,expected",
    [
        (
            lambda s: s.pop("double_blocks.1.img_attn.qkv.bias"),
            "missing key(s): double_blocks.1.img_attn.qkv.bias",
        ),
        (lambda s: s.update({"pulid_extra.weight": torch.zeros(2)}), "unexpected key(s): pulid_extra.weight"),
        (
            lambda s: s.update({"txt_in.weight": torch.zeros(64, 25)}),
            "txt_in.weight: file (64, 25) vs model (64, 24)",
        ),
    ],
)
def test_mismatched_checkpoint_names_the_file_and_keys(tiny_checkpoint, tmp_path, edit, expected):
    path, state = tiny_checkpoint
    state = dict(state)
    edit(state)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(CheckpointError) as err:
        load_flow_model_from_file(bad, tiny_flux_params(), "cpu")
    assert expected in str(err.value) and str(bad) in str(err.value)


@pytest.mark.parametrize(
    "keys,hint",
    [
        ({"transformer_blocks.0.attn.to_q.weight": torch.zeros(2)}, "diffusers"),
        ({"double_blocks.0.img_attn.qkv.weight._data": torch.zeros(2)}, "--fp8"),
        ({"decoder.conv_in.weight": torch.zeros(2)}, "autoencoder"),
    ],
)
def test_wrong_model_gets_a_hint(tmp_path, keys, hint):
    path = tmp_path / "other.safetensors"
    save_file(keys, str(path))
    with pytest.raises(CheckpointError, match=hint):
        load_flow_model_from_file(path, tiny_flux_params(), "cpu")


def test_truncated_and_non_safetensors_files_are_named(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    data = path.read_bytes()
    for name, content in [("truncated.safetensors", data[: len(data) // 2]), ("text.safetensors", b"hello")]:
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
            load_flow_model_from_file(bad, tiny_flux_params(), "cpu")
        assert name in str(err.value)


def test_autoencoder_loads_in_float32(tmp_path):
    ae = AutoEncoder(tiny_ae_params())
    state = {k: v.contiguous() for k, v in ae.state_dict().items()}
    save_file(state, str(tmp_path / "tiny-ae.safetensors"))
    loaded = load_autoencoder(tiny_spec(), "cpu", models_dir=tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    assert next(loaded.parameters()).dtype == torch.float32


def test_missing_gated_file_offline_explains_everything(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as err:
        load_flow_model(MODELS["flux-dev"], "cpu", models_dir=tmp_path)
    message = str(err.value)
    for fact in [
        "black-forest-labs/FLUX.1-dev",
        "flux1-dev.safetensors",
        "23.8 GB",
        str(tmp_path / "flux1-dev.safetensors"),
        "licence",
        "HF_TOKEN",
        "HF_HUB_OFFLINE",
    ]:
        assert fact in message


def test_refused_download_is_explained(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    spec = MODELS["flux-dev"].ae
    response = httpx.Response(401, request=httpx.Request("GET", "https://huggingface.co/x"))
    for error, expected in [
        (GatedRepoError("gated", response=response), "refused"),
        (LocalEntryNotFoundError("offline"), "cannot be reached"),
    ]:

        def refuse(*args, _error=error, **kwargs):
            raise _error

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
        with pytest.raises(WeightsNotFoundError, match=expected) as err:
            resolve_weight(spec, models_dir=tmp_path)
        assert "ae.safetensors" in str(err.value) and "HF_TOKEN" in str(err.value)


def test_download_goes_to_the_hf_cache_when_not_local(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    fetched = tmp_path / "cache" / "file.safetensors"
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        return str(fetched)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    spec = WeightFile("org/repo", "w.safetensors", 10, "w.safetensors", "a test file")
    assert resolve_weight(spec, models_dir=tmp_path) == fetched
    assert calls == [("org/repo", "w.safetensors", {})]  # no local_dir: the HF cache
    (tmp_path / "w.safetensors").write_bytes(b"x")
    assert resolve_weight(spec, models_dir=tmp_path) == tmp_path / "w.safetensors"
    with pytest.raises(WeightsNotFoundError, match="not a file"):
        resolve_weight(spec, explicit_path=tmp_path / "nope.safetensors", models_dir=tmp_path)
