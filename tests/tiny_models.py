"""Tiny random models and their inputs, shared by the numeric tests of the DiT and what wraps it."""

import numpy as np
import torch

from flux.model import Flux
from flux.sampling import image_ids, pack, text_ids
from pulid.encoders import PerceiverAttentionCA, num_pulid_ca
from tiny_random.models import tiny_flux_params

# float64 module vs float64 reference. Like the official model, the module computes RoPE and the
# timestep sinusoids in float32 whatever the activation dtype, which bounds the agreement at ~1e-6.
DIT_TOL_F64 = 1e-5


def random_model(params, dtype=torch.float64, seed=0) -> Flux:
    torch.manual_seed(seed)
    model = Flux(params)
    with torch.no_grad():  # non-trivial norms and biases, so every term matters
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.5 / max(p.shape[-1], 1) ** 0.5))
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype).eval()


def random_inputs(params, batch=2, latent_hw=(8, 6), n_txt=5, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 16, *latent_hw, generator=g, dtype=dtype)
    return dict(
        img=pack(latents),
        img_ids=image_ids(batch, *latent_hw).to(dtype),
        txt=torch.randn(batch, n_txt, params.context_in_dim, generator=g, dtype=dtype),
        txt_ids=text_ids(batch, n_txt).to(dtype),
        timesteps=torch.rand(batch, generator=g, dtype=dtype),
        y=torch.randn(batch, params.vec_in_dim, generator=g, dtype=dtype),
        guidance=torch.rand(batch, generator=g, dtype=dtype) * 5,
    )


TINY_CA = dict(dim=64, dim_head=16, heads=2, kv_dim=48)


def tiny_ca_modules(params, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    modules = torch.nn.ModuleList(
        PerceiverAttentionCA(**TINY_CA) for _ in range(num_pulid_ca(params.depth, params.depth_single_blocks))
    )
    return modules.to(dtype).eval()


def dit_inputs(flow, tokens=(6, 8), txt=10, seed=3):
    g = torch.Generator().manual_seed(seed)
    h, w = tokens
    params = flow.params
    ids = torch.zeros(1, h * w, 3)
    ids[0, :, 1] = torch.arange(h).repeat_interleave(w)
    ids[0, :, 2] = torch.arange(w).repeat(h)
    return dict(
        img=torch.randn(1, h * w, params.in_channels, generator=g),
        img_ids=ids,
        txt=torch.randn(1, txt, params.context_in_dim, generator=g),
        txt_ids=torch.zeros(1, txt, 3),
        timesteps=torch.tensor([0.7]),
        y=torch.randn(1, params.vec_in_dim, generator=g),
        guidance=torch.tensor([3.5]),
    )


def small_dit() -> Flux:
    torch.manual_seed(11)
    return Flux(tiny_flux_params(depth=2, depth_single_blocks=2)).eval()


def init_photo(seed: int, height: int = 256, width: int = 320) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
