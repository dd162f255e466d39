"""PuLID-FLUX: identity encoder and the cross-attention weights injected into the FLUX DiT."""
