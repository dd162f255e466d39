"""Strict loading of tiny checkpoints written in the official key layout, and every error path."""

import re
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

from flux.autoencoder import AutoEncoder
from flux.checkpoint import CheckpointError
from flux.hub import HubWeights, WeightsNotFoundError, download, find_local
from flux.loading import load_autoencoder, load_flow_model
from flux.model import Flux
from pulid.catalogue import required_weights
from pulid.loading import locate_weights
from tests.tiny_configs import tiny_ae_params, tiny_flux_params


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A random tiny DiT saved as bf16 safetensors in the official key layout."""
    torch.manual_seed(0)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in Flux(tiny_flux_params()).state_dict().items()}
    path = tmp_path / "tiny-flux.safetensors"
    save_file(state, str(path))
    return path, state


def test_loads_every_tensor_to_target_dtype(tiny_checkpoint, tmp_path):
    path, state = tiny_checkpoint
    model = load_flow_model(path, tiny_flux_params(), device="cpu", dtype=torch.bfloat16)
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert all(
        p.dtype == torch.bfloat16 and not p.is_meta and not p.requires_grad for p in model.parameters()
    )


def test_cast_on_load(tiny_checkpoint, tmp_path):
    path, state = tiny_checkpoint
    other = tmp_path / "elsewhere.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in state.items()}, str(other))
    model = load_flow_model(other, tiny_flux_params(), device="cpu", dtype=torch.float32)
    assert all(p.dtype == torch.float32 and p.abs().sum() == 0 for p in model.parameters())


def test_a_file_of_another_dtype_kind_is_refused_with_the_keys(tiny_checkpoint, tmp_path):
    path, state = tiny_checkpoint
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in state.items()}
    bad = tmp_path / "fp8.safetensors"
    save_file(fp8, str(bad))
    with pytest.raises(CheckpointError, match=r"wrong dtype: .*file F8_E4M3 vs model BF16/F16/F32/F64"):
        load_flow_model(bad, tiny_flux_params(), "cpu")


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
        load_flow_model(bad, tiny_flux_params(), "cpu")
    assert expected in str(err.value) and str(bad) in str(err.value)


@pytest.mark.parametrize(
    "keys,hint",
    [
        ({"transformer_blocks.0.attn.to_q.weight": torch.zeros(2)}, "diffusers"),
        ({"double_blocks.0.img_attn.qkv.weight._data": torch.zeros(2)}, "--fp8"),
        ({"decoder.conv_in.weight": torch.zeros(2)}, "autoencoder"),
        ({"input_blocks.0.0.weight": torch.zeros(2)}, "Stable Diffusion UNet"),
        (  # a whole transformer without guidance_in
            {
                k: torch.zeros(2)
                for k in ("time_in.in_layer.weight", "double_blocks.0.x", "final_layer.linear.weight")
            },
            "FLUX.1-schnell",
        ),
    ],
)
def test_wrong_model_gets_a_hint(tmp_path, keys, hint):
    path = tmp_path / "other.safetensors"
    save_file(keys, str(path))
    with pytest.raises(CheckpointError, match=hint):
        load_flow_model(path, tiny_flux_params(), "cpu")


def test_a_partial_transformer_is_not_taken_for_schnell(tmp_path):
    path = tmp_path / "partial.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2)}, str(path))  # most keys gone
    with pytest.raises(CheckpointError) as err:
        load_flow_model(path, tiny_flux_params(), "cpu")
    assert "missing key(s)" in str(err.value) and "schnell" not in str(err.value)


def test_truncated_and_non_safetensors_files_are_named(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    data = path.read_bytes()
    torch.save({"w": torch.zeros(2)}, tmp_path / "pickle.pt")
    for name, content, said in [
        ("truncated.safetensors", data[: len(data) // 2], "It may be truncated or corrupt"),
        ("text.safetensors", b"hello", "is a text file, not a safetensors file"),
        ("empty.safetensors", b"", "is an empty file, not a safetensors file"),
        ("weights.ckpt", (tmp_path / "pickle.pt").read_bytes(), "is a PyTorch pickle (.pt, .pth, .ckpt)"),
    ]:
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(CheckpointError, match=re.escape(said)) as err:
            load_flow_model(bad, tiny_flux_params(), "cpu")
        assert name in str(err.value)


LFS_POINTER = (
    b"version https://git-lfs.github.com/spec/v1\n"
    b"oid sha256:4f6fc5a3a3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3\nsize 12708987872\n"
)


@pytest.mark.parametrize(
    "name,fmt", [("flux1-dev-Q8_0.gguf", "gguf"), ("flux1-dev.safetensors", "safetensors")]
)
def test_a_git_lfs_pointer_is_named_with_the_format_asked_for(tmp_path, name, fmt):
    """A clone without git-lfs leaves 130-byte pointers: a .gguf one was told to "give the
    .safetensors file". Through the --dit door and the T5 file door."""
    from flux.loading import open_dit_file
    from flux.text_encoders import open_t5_file

    pointer = tmp_path / name
    pointer.write_bytes(LFS_POINTER)
    for door in (open_dit_file, open_t5_file):
        with pytest.raises(CheckpointError) as err:
            door(pointer)
        message = str(err.value)
        assert f"{name} is a Git LFS pointer, not the weights" in message and "git lfs pull" in message
        assert f"not a {fmt} file: give the .{fmt} file itself" in message
        assert ".safetensors" not in message or fmt == "safetensors"


def test_autoencoder_loads_in_float32(tmp_path):
    ae = AutoEncoder(tiny_ae_params())
    state = {k: v.contiguous() for k, v in ae.state_dict().items()}
    save_file(state, str(tmp_path / "tiny-ae.safetensors"))
    loaded = load_autoencoder(tmp_path / "tiny-ae.safetensors", tiny_ae_params(), "cpu")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    assert next(loaded.parameters()).dtype == torch.float32


def test_missing_gated_file_offline_explains_everything(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    entries = {"dit": required_weights()["dit"]}
    with pytest.raises(WeightsNotFoundError) as err:
        locate_weights(entries, tmp_path, command="python -m pulid.serve.download")
    message = str(err.value)
    for fact in [
        "black-forest-labs/FLUX.1-dev",
        "flux1-dev.safetensors",
        "23.8 GB",
        str(tmp_path / "flux1-dev.safetensors"),
        "licence",
        "HF_TOKEN",
        "HF_HUB_OFFLINE",
        "python -m pulid.serve.download",
    ]:
        assert fact in message


def test_refused_download_is_explained(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError

    entry = required_weights()["ae"].weights
    response = httpx.Response(401, request=httpx.Request("GET", "https://huggingface.co/x"))
    for error, expected in [
        (GatedRepoError("gated", response=response), "accept its licence"),
        (LocalEntryNotFoundError("offline"), "the download of black-forest-labs/FLUX.1-dev failed"),
    ]:

        def refuse(*args, _error=error, **kwargs):
            raise _error

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
        with pytest.raises(WeightsNotFoundError, match=expected) as err:
            download(entry, tmp_path)
        assert "autoencoder" in str(err.value)


def test_download_lands_at_the_catalogue_place_or_in_the_cache(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, local_dir=None, **kwargs):
        calls.append((repo_id, filename, local_dir))
        target = Path(local_dir or tmp_path / "cache") / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"x")
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    renamed = HubWeights("org/repo", ("ae.safetensors",), 10, "krea-ae.safetensors", "a test file")
    assert download(renamed, tmp_path / "models") == tmp_path / "models" / "krea-ae.safetensors"
    assert (tmp_path / "models" / "krea-ae.safetensors").read_bytes() == b"x"
    folder = HubWeights("org/enc", ("config.json", "w.safetensors"), 10, "enc", "an encoder", folder=True)
    assert download(folder, tmp_path / "models") == tmp_path / "models" / "enc"
    assert calls[-1] == ("org/enc", "w.safetensors", tmp_path / "models" / "enc")
    assert download(renamed) == tmp_path / "cache" / "ae.safetensors"  # no models dir: the HF cache
    assert calls[-1][2] is None
    assert find_local(folder, tmp_path / "models") == tmp_path / "models" / "enc"
    with pytest.raises(WeightsNotFoundError, match="is not a file"):
        find_local(renamed, tmp_path, explicit_path=tmp_path / "nope.safetensors")
