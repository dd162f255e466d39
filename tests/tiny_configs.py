"""Tiny hyper-parameters for the numeric tests (see :mod:`tiny_random.models`)."""

from tiny_random.models import tiny_ae_params as _tiny_ae_params
from tiny_random.models import tiny_flux_params as _tiny_flux_params


def tiny_flux_params(**overrides):
    return _tiny_flux_params(**{"vec_in_dim": 16, "context_in_dim": 24, **overrides})


def tiny_ae_params(**overrides):
    return _tiny_ae_params(**{"ch_mult": [1, 2], **overrides})
