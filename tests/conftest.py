"""Shared pytest setup.

The environment variables are set at import time, before any test module imports gradio,
huggingface_hub or transformers: the tests must never reach a model hub or analytics server.
"""

import os

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
}.items():
    os.environ.setdefault(_key, _value)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """Stand-in antelopev2 and facexlib files (real formats, built once per test session)."""
    from tiny_random.pipeline import build_tiny_face_models

    return build_tiny_face_models(tmp_path_factory.mktemp("models"))
