"""FLUX.1 flow transformer, autoencoder, text encoders and sampler (official key layouts)."""
