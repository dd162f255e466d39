"""The full-size models, built on the meta device, are exactly the official checkpoints' layout."""

import json
from pathlib import Path

import pytest
import torch

from flux.autoencoder import AutoEncoder
from flux.loading import build_flow_model
from flux.registry import MODELS

MANIFESTS = Path(__file__).resolve().parents[2] / "shared" / "checkpoints"


def manifest(name: str) -> dict:
    path = MANIFESTS / name
    if not path.is_file():  # a checkout without shared/ beside it cannot check the contract
        pytest.fail(f"checkpoint manifest {path} is missing: shared/ must sit beside the repository")
    return json.loads(path.read_text())["tensors"]


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


def test_registry_sizes_match_the_manifests():
    flux = json.loads((MANIFESTS / "flux1-dev.manifest.json").read_text())
    ae = json.loads((MANIFESTS / "ae.manifest.json").read_text())
    assert MODELS["flux-dev"].flow.size_bytes == flux["total_bytes_in_tensors"]
    assert MODELS["flux-dev"].ae.size_bytes == ae["total_bytes_in_tensors"]
