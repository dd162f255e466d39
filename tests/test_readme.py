"""README stays true: its commands exist, and it lists every weight file the code loads."""

import re
from pathlib import Path

from eva_clip.model import EVA_CLIP_WEIGHTS
from flux.hub import format_size
from flux.registry import MODELS
from flux.text_encoders import CLIP_SOURCE, T5_SOURCE
from pulid.face_analysis import FACEXLIB_WEIGHTS, INSIGHTFACE_WEIGHTS
from pulid.weights import PULID_VERSIONS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_quick_start_commands():
    assert "bash scripts/setup_env.sh && .venv/bin/python app_flux.py" in README
    assert "bash scripts/setup_env.sh && .venv/bin/python app_flux.py --preset tiny-random" in README
    assert "bash scripts/setup_env.sh --cpu --test && .venv/bin/python -m pytest -q" in README
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "-m pytest -q" in ci and "setup_env.sh" in ci


def test_space_front_matter():
    front = README.split("---")[1]
    assert re.search(r"^sdk: gradio$", front, re.M) and re.search(r"^app_file: app_flux.py$", front, re.M)


def test_every_weight_file_is_listed_with_its_place_and_size():
    specs = [
        MODELS["flux-dev"].flow,
        MODELS["flux-dev"].ae,
        EVA_CLIP_WEIGHTS,
        *PULID_VERSIONS.values(),
        *INSIGHTFACE_WEIGHTS,
        *FACEXLIB_WEIGHTS,
    ]
    for spec in specs:
        rows = [line for line in README.splitlines() if f"`models/{spec.local_name}`" in line]
        assert len(rows) == 1, spec.local_name
        assert f"`{spec.repo_id}`" in rows[0] and f"`{spec.filename}`" in rows[0]
        number, unit = re.search(r"\| ([\d.]+) (GB|MB) \|", rows[0]).groups()
        stated = float(number) * {"GB": 1e9, "MB": 1e6}[unit]
        assert abs(stated - spec.size_bytes) / spec.size_bytes < 0.05, (
            spec.filename,
            format_size(spec.size_bytes),
        )
    for source in (T5_SOURCE, CLIP_SOURCE):
        assert f"`models/{source.local_name}/`" in README and source.repo_id in README
    for name in ("flux1-krea-dev.safetensors", "krea-ae.safetensors", "flux-dev-fp8.safetensors"):
        assert name in README
