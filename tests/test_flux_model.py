"""The DiT against an independent float64 computation, and its identity-injection interface."""

import pytest
import torch

from flux.model import Flux
from tests.numerics import rel_err
from tests.reference_flux import flux_forward
from tests.tiny_configs import tiny_flux_params
from tests.tiny_models import DIT_TOL_F64, random_inputs, random_model

# float32 module vs float64 reference.
TOL_F32 = 2e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float64, DIT_TOL_F64), (torch.float32, TOL_F32)])
def test_dit_forward_matches_float64_reference(dtype, tol):
    params = tiny_flux_params()
    model = random_model(params, dtype)
    inputs = random_inputs(params, dtype=dtype, seed=int(torch.randint(0, 10_000, ())))
    with torch.no_grad():
        out = model(**inputs)
    ref = flux_forward(model.state_dict(), params, **inputs)
    assert out.shape == (2, 12, 64)
    assert rel_err(out, ref) < tol


def test_dit_without_guidance_embedding_matches_reference():
    params = tiny_flux_params(guidance_embed=False, depth=1, depth_single_blocks=1)
    model = random_model(params)
    inputs = random_inputs(params)
    with torch.no_grad():
        out = model(**{**inputs, "guidance": None})
    assert rel_err(out, flux_forward(model.state_dict(), params, **inputs)) < DIT_TOL_F64


def test_guidance_is_required_by_guidance_distilled_model():
    params = tiny_flux_params(depth=1, depth_single_blocks=1)
    inputs = random_inputs(params)
    with pytest.raises(ValueError, match="guidance"):
        random_model(params)(**{**inputs, "guidance": None})


class RecordingInjection:
    """Adds a fixed random residual after every block and records where it was called."""

    def __init__(self, hidden: int, n_img: int, seed: int = 3):
        g = torch.Generator().manual_seed(seed)
        self.double = torch.randn(n_img, hidden, generator=g, dtype=torch.float64)
        self.single = torch.randn(n_img, hidden, generator=g, dtype=torch.float64)
        self.calls: list[tuple[str, int, tuple]] = []

    def after_double_block(self, index, img):
        self.calls.append(("double", index, tuple(img.shape)))
        return (self.double * (index + 1)).to(img) if index % 2 == 0 else None

    def after_single_block(self, index, img):
        self.calls.append(("single", index, tuple(img.shape)))
        return (self.single * (index + 1)).to(img)

    def reference(self, kind, index, img):
        if kind == "double":
            return self.double * (index + 1) if index % 2 == 0 else None
        return self.single * (index + 1)


def test_id_injection_adds_residuals_to_image_tokens_only():
    params = tiny_flux_params()
    model = random_model(params)
    inputs = random_inputs(params)
    hook = RecordingInjection(params.hidden_size, n_img=12)
    with torch.no_grad():
        out = model(**inputs, id_injection=hook)
        base = model(**inputs)
    ref = flux_forward(model.state_dict(), params, **inputs, residual_fn=hook.reference)
    assert rel_err(out, ref) < DIT_TOL_F64
    assert rel_err(out, base) > 1e-3  # the residuals really changed the output
    assert [c[:2] for c in hook.calls] == [
        ("double", 0),
        ("double", 1),
        ("single", 0),
        ("single", 1),
        ("single", 2),
    ]
    assert all(shape == (2, 12, params.hidden_size) for _, _, shape in hook.calls)  # image tokens only


def test_injection_returning_none_is_exactly_the_base_model():
    class Nothing:
        def after_double_block(self, index, img):
            return None

        def after_single_block(self, index, img):
            return None

    params = tiny_flux_params()
    model = random_model(params, torch.float32)
    inputs = random_inputs(params, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model(**inputs, id_injection=Nothing()), model(**inputs))


def test_model_keeps_no_state_between_calls():
    params = tiny_flux_params()
    model = random_model(params, torch.float32)
    inputs = random_inputs(params, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        first = model(**inputs)
        model(**inputs, id_injection=RecordingInjection(params.hidden_size, 12))
        again = model(**inputs)
    assert torch.equal(first, again)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(v, RecordingInjection) for v in vars(model).values())


def test_bad_params_are_rejected():
    with pytest.raises(ValueError, match="axes_dim"):
        Flux(tiny_flux_params(axes_dim=[8, 8, 8]))
    with pytest.raises(ValueError, match="divisible"):
        Flux(tiny_flux_params(num_heads=3))
