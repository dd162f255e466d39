"""The full-size models, built on the meta device, are exactly the official checkpoints' layout."""

import pytest
import torch

from flux.autoencoder import AutoEncoder
from flux.loading import build_flow_model
from flux.registry import MODELS
from pulid.catalogue import required_weights
from tests.manifests import read_manifest


def manifest(name: str) -> dict:
    return read_manifest(name)["tensors"]


def layout(state_dict) -> list[tuple[str, list[int], str]]:
    return [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state_dict.items()]


def manifest_layout(tensors: dict) -> list[tuple[str, list[int], str]]:
    return [(k, v["shape"], v["dtype"]) for k, v in tensors.items()]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_flux_dit_matches_the_flux1_dev_manifest(name):
    model = build_flow_model(MODELS[name].params, device="meta", dtype=torch.bfloat16)
    assert layout(model.state_dict()) == manifest_layout(manifest("flux1-dev.manifest.json"))
    assert sum(p.numel() for p in model.parameters()) == 11_901_408_320


def test_autoencoder_matches_the_ae_manifest():
    with torch.device("meta"):
        ae = AutoEncoder(MODELS["flux-dev"].ae_params)
    assert layout(ae.state_dict()) == manifest_layout(manifest("ae.manifest.json"))


def test_catalogue_sizes_match_the_manifests():
    needed = required_weights("flux-dev")
    for role, name in [
        ("dit", "flux1-dev.manifest.json"),
        ("ae", "ae.manifest.json"),
        ("pulid", "pulid_flux_v0.9.x.manifest.json"),
    ]:
        assert needed[role].weights.size_bytes == read_manifest(name)["total_bytes_in_tensors"], role
    fp8 = required_weights("flux-dev", fp8="quanto")["dit"].weights
    assert (
        fp8.size_bytes == read_manifest("flux-dev-fp8.xlabs-quanto.manifest.json")["total_bytes_in_tensors"]
    )
