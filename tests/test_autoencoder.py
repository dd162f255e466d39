"""The autoencoder against an independent float64 computation of the same math."""

import torch

from flux.autoencoder import AutoEncoder
from tests.numerics import rel_err
from tests.reference_flux import ae_decode, ae_encode_mean
from tests.tiny_configs import tiny_ae_params

TOL_F64 = 1e-10  # float64 module vs float64 reference: rounding order only
TOL_F32 = 1e-5


def random_ae(params, dtype=torch.float64):
    torch.manual_seed(int(torch.randint(0, 10_000, ())))
    ae = AutoEncoder(params)
    with torch.no_grad():
        for name, p in ae.named_parameters():
            if "norm" in name:  # GroupNorm affine: away from the trivial (1, 0) init
                p.add_(torch.randn_like(p) * 0.2)
    return ae.to(dtype).eval()


def test_decode_matches_float64_reference():
    params = tiny_ae_params()
    ae = random_ae(params)
    z = torch.randn(2, 16, 6, 5, dtype=torch.float64)
    with torch.no_grad():
        out = ae.decode(z)
    assert out.shape == (2, 3, 12, 10)  # one upsampling stage in the tiny config
    assert rel_err(out, ae_decode(ae.state_dict(), params, z)) < TOL_F64


def test_decode_float32_matches_float64_reference():
    params = tiny_ae_params(ch_mult=[1, 1, 2])
    ae = random_ae(params, torch.float32)
    z = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        out = ae.decode(z)
    assert out.shape == (1, 3, 16, 16)
    assert rel_err(out, ae_decode(ae.state_dict(), params, z)) < TOL_F32


def test_encode_mean_matches_reference_and_sampling_is_around_it():
    params = tiny_ae_params()
    ae = random_ae(params)
    x = torch.rand(1, 3, 16, 12, dtype=torch.float64) * 2 - 1
    ref = ae_encode_mean(ae.state_dict(), params, x)
    ae.reg.sample = False
    with torch.no_grad():
        mean = ae.encode(x)
        ae.reg.sample = True
        sample = ae.encode(x)
    assert mean.shape == (1, 16, 8, 6)
    assert rel_err(mean, ref) < TOL_F64
    assert not torch.equal(sample, mean)
