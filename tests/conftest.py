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


@pytest.fixture(scope="session")
def outside_folder():
    """A folder outside both the working directory and the temp folder, as a Space's ``/data``
    is: gradio copies files from those two only, so the app's outputs are kept here in tests."""
    import shutil
    import tempfile
    from pathlib import Path

    cwd, temp = Path.cwd().resolve(), Path(tempfile.gettempdir()).resolve()
    for base in (Path("/var/tmp"), Path.home()):
        base = base.resolve()
        if base.is_dir() and os.access(base, os.W_OK) and not {cwd, temp} & {base, *base.parents}:
            break
    else:
        pytest.fail("no writable folder outside the working directory and the temp folder")
    folder = Path(tempfile.mkdtemp(prefix="pulid-flux-tests-", dir=base))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
