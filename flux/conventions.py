"""FLUX.1's numbers and rules that settings and front doors need before any model: kept free of
torch, so that ``--help`` and the settings' checks start in well under a second."""

from __future__ import annotations

TOKEN_PIXELS = 16  # one image token of the DiT: a 2 x 2 patch of 8 x 8-pixel latent cells
T5_MAX_LENGTHS = (128, 256, 384, 512)  # the T5 prompt lengths the official code offers


def uses_true_cfg(true_cfg: float) -> bool:
    """Whether a true-CFG scale asks for the negative pass: the official code's rule, a scale
    further than 0.01 from 1."""
    return abs(true_cfg - 1.0) > 1e-2
