"""Tiny random-weight models and stand-in face models: fixtures for the tests and the ``tiny-random`` preset.

Nothing here is part of the product's numerics. Every model is a real class of ``flux``, ``pulid``
or ``eva_clip`` (or a file in the real format of insightface and facexlib) at a size that runs on
a CPU in seconds, so tests and ``app_flux.py --preset tiny-random`` drive the real code paths
without downloading 35 GB of weights. The images they make are noise.
"""
