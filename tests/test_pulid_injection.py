"""ID injection into the DiT: where, how much, and that no ID means exactly the base model."""

import pytest
import torch

from flux.model import Flux, IDInjection
from pulid.encoders import PuLIDWeights, num_pulid_ca
from pulid.injection import Identity, PuLIDInjection
from tests.numerics import rel_err
from tests.reference_flux import flux_forward
from tests.tiny_configs import tiny_flux_params
from tests.tiny_models import DIT_TOL_F64, TINY_CA, random_inputs, random_model, tiny_ca_modules


@pytest.mark.parametrize("depth,single,expected", [(19, 38, 20), (2, 3, 2), (5, 9, 6), (1, 1, 2)])
def test_number_of_cross_attentions_follows_the_depth(depth, single, expected):
    assert num_pulid_ca(depth, single) == expected


def test_injection_points_and_module_order():
    calls = []

    def recorder(i):
        def ca(id_tokens, img):
            calls.append(i)
            return torch.zeros_like(img)

        return ca

    injection = PuLIDInjection([recorder(i) for i in range(6)], [Identity(torch.zeros(1, 4, 48), 1.0)], 5, 9)
    assert isinstance(injection, IDInjection)
    img = torch.zeros(1, 3, 64)
    hits_double = [i for i in range(5) if injection.after_double_block(i, img) is not None]
    hits_single = [i for i in range(9) if injection.after_single_block(i, img) is not None]
    assert hits_double == [0, 2, 4] and hits_single == [0, 4, 8]
    assert calls == [0, 1, 2, 3, 4, 5]  # double-block modules first, then single-block ones


def test_full_size_injection_points_match_the_official_ones():
    injection = PuLIDInjection([lambda x, y: y] * 20, [Identity(torch.zeros(1), 1.0)], 19, 38)
    img = torch.ones(1)
    assert [i for i in range(19) if injection.after_double_block(i, img) is not None] == list(range(0, 19, 2))
    assert [i for i in range(38) if injection.after_single_block(i, img) is not None] == list(range(0, 38, 4))


def test_wrong_number_of_modules_is_an_error():
    with pytest.raises(ValueError, match="expected 20"):
        PuLIDInjection([lambda x, y: y] * 19, [Identity(torch.zeros(1), 1.0)], 19, 38)


def test_dit_with_id_matches_reference_with_cross_attention_residuals():
    params = tiny_flux_params()
    model = random_model(params)
    cas = tiny_ca_modules(params)
    inputs = random_inputs(params, batch=1)
    id_tokens = torch.randn(1, 6, 48, dtype=torch.float64)
    weight = 0.7
    with torch.no_grad():
        out = model(
            **inputs,
            id_injection=PuLIDInjection(
                cas, [Identity(id_tokens, weight)], params.depth, params.depth_single_blocks
            ),
        )
        base = model(**inputs)

        def residual(kind, index, img):
            if kind == "double":
                return weight * cas[index // 2](id_tokens, img) if index % 2 == 0 else None
            return weight * cas[1 + index // 4](id_tokens, img) if index % 4 == 0 else None

        ref = flux_forward(model.state_dict(), params, **inputs, residual_fn=residual)
    assert rel_err(out, ref) < DIT_TOL_F64
    assert rel_err(out, base) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_id_weight_zero_is_exactly_no_id(dtype):
    params = tiny_flux_params()
    model: Flux = random_model(params, dtype)
    cas = tiny_ca_modules(params, dtype)
    inputs = random_inputs(params, batch=1, dtype=dtype)
    id_tokens = torch.randn(1, 6, 48, dtype=dtype)
    with torch.no_grad():
        zero = model(
            **inputs,
            id_injection=PuLIDInjection(
                cas, [Identity(id_tokens, 0.0)], params.depth, params.depth_single_blocks
            ),
        )
        none = model(**inputs)
    assert torch.equal(zero, none)


def test_pulid_weights_container_holds_one_module_per_insertion_point():
    weights = PuLIDWeights(
        num_pulid_ca(2, 3),
        encoder_kwargs=dict(
            dim=32,
            depth=5,
            dim_head=8,
            heads=2,
            num_queries=4,
            output_dim=48,
            id_dim=40,
            vit_dim=24,
            mapping_dim=16,
        ),
        ca_kwargs=TINY_CA,
    )
    assert len(weights.pulid_ca) == 2
    assert {k.split(".")[0] for k in weights.state_dict()} == {"pulid_encoder", "pulid_ca"}
