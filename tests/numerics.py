"""The error measure every numeric test states its tolerance in."""

import torch


def fresh_seed() -> int:
    """A new seed per run, so numeric tests see fresh random inputs."""
    return int(torch.randint(0, 2**31 - 1, ()))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, computed in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
