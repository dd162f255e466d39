"""The layering and the fresh-clone promises, checked on the source itself.

- imports run one way: the front ends, ``pulid.serve``, the preset's fixtures (``tiny_random``),
  the library ``pulid``, ``eva_clip``, ``flux`` (:mod:`tests.import_map`); the library never
  imports a serving library; identity modules never import generation; no circles anywhere;
- ``generate.py`` does not reach the Gradio app;
- nothing in the repository reads the shared folder beside the checkout (a user's clone has none);
- the package builds with its entry points and the dependencies of the requirement files.
"""

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.import_map import cycles, import_map, rule_breaks

REPO = Path(__file__).resolve().parent.parent
# Ways of naming the shared folder that sits beside the repository on the project's own machines
# (spelled in pieces so that this file does not name it itself).
SHARED = "sha" + "red"
OUTSIDE_FOLDERS = (f"../{SHARED}", f"/work/{SHARED}", f'parents[2] / "{SHARED}"')


def sources(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (REPO / folder).rglob("*.py"))


def test_imports_run_one_way_and_the_library_imports_no_serving_library():
    assert rule_breaks(REPO) == []


def test_there_are_no_import_circles():
    assert cycles(REPO) == []


def planted(tmp_path: Path, module: str, source: str) -> Path:
    """A copy of the repository's packages and front ends with ``module`` replaced by ``source``."""
    for name in ("flux", "eva_clip", "pulid", "tiny_random"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("app_flux.py", "generate.py"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / module.replace(".", "/")).with_suffix(".py").write_text(source)
    return tmp_path


@pytest.mark.parametrize(
    "module, source, found",
    [
        (
            "flux/sampling",
            "from pulid.pipeline import PuLIDFluxPipeline\n",
            "flux.sampling imports pulid.pipeline",
        ),
        (
            "pulid/pipeline",
            "def f():\n    from pulid.serve import service\n",
            "pulid.pipeline imports pulid.serve",
        ),
        ("pulid/outputs", "import gradio as gr\n", "pulid.outputs imports gradio, a serving library"),
        ("pulid/id_encoder", "from pulid.pipeline import STAGES\n", "(identity) imports pulid.pipeline"),
        (
            "pulid/loras",
            "import tiny_random.loras\n",
            "pulid.loras imports tiny_random.loras, a layer above it",
        ),
        ("pulid/serve/service", "import app_flux\n", "pulid.serve.service imports app_flux"),
    ],
)
def test_a_planted_violation_is_named(tmp_path, module, source, found):
    breaks = rule_breaks(planted(tmp_path, module, source))
    assert any(found in line for line in breaks), breaks


def test_a_planted_circle_is_found_through_a_lazy_import_and_a_package(tmp_path):
    """``flux.gguf_file`` imports ``flux.quant.ggml``, which runs ``flux.quant`` first, whose
    formats import ``flux.checkpoint``: a lazy import back from there is a circle."""
    root = planted(tmp_path, "flux/headers", "")
    checkpoint = root / "flux" / "checkpoint.py"
    checkpoint.write_text(checkpoint.read_text() + "\n\ndef f():\n    from flux.gguf_file import GGUFFile\n")
    (found,) = cycles(root)
    assert {"flux.checkpoint", "flux.gguf_file", "flux.quant"} <= set(found)


def test_the_command_line_does_not_reach_the_gradio_app():
    ours, others = import_map(REPO)
    reached, todo = set(), ["generate"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(ours[module])
    assert "pulid.serve.gradio_app" not in reached
    assert not set().union(*(others[m] for m in reached)) & {"gradio", "ray", "spaces"}


def test_the_front_ends_are_entry_points_only():
    for name in ("app_flux.py", "generate.py"):
        ours, _ = import_map(REPO)
        lines = [line for line in (REPO / name).read_text().splitlines() if line.strip()]
        assert len(ours[name[:-3]]) <= 3 and len(lines) < 15, name


def test_nothing_reads_a_shared_folder_beside_the_repository():
    offenders = []
    for name in repository_files():
        path = REPO / name
        if path.suffix not in (".py", ".sh", ".md", ".toml", ".txt", ".cfg", "") or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="ignore")
        if any(pattern in text for pattern in OUTSIDE_FOLDERS):
            offenders.append(name)
    assert not offenders, f"these files refer to a shared/ folder outside the repository: {offenders}"


def repository_files() -> list[str]:
    """The files a clone has: tracked, plus new ones not ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return [name for name in listed.stdout.splitlines() if (REPO / name).is_file()]


def test_the_package_builds_with_entry_points_and_the_requirement_files(tmp_path):
    clone = tmp_path / "clone"  # a clean copy: setuptools' build/ folder must not mix in old files
    for name in repository_files():
        target = clone / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(clone),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("/METADATA"))).decode()
        entry_points = archive.read(next(n for n in names if n.endswith("/entry_points.txt"))).decode()
    for module in (
        "app_flux.py",
        "generate.py",
        "flux/offload/plan.py",
        "flux/lora/adapters.py",
        "flux/quant/fp8_linear.py",
        "pulid/catalogue.py",
        "pulid/serve/gradio_app.py",
        "eva_clip/model.py",
        "tiny_random/face_models.py",
    ):
        assert module in names, module
    assert not any(n.startswith(("tests/", "benchmarks/", "models/")) for n in names)
    for script in (
        "pulid-flux = pulid.serve.gradio_app:run",
        "pulid-flux-generate = pulid.serve.cli:run",
        "pulid-flux-download = pulid.serve.download:main",
    ):
        assert script in entry_points
    base = [
        line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    listed = [
        line.strip()
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert len(base) == len(listed) and "License-Expression: Apache-2.0" in metadata
    for requirement in listed:
        name = requirement.split("<")[0].split(">")[0].split("=")[0]
        assert any(line.startswith(f"Requires-Dist: {name}") for line in base), requirement
    assert 'Requires-Dist: optimum-quanto<0.3,>=0.2.7; extra == "fp8"' in metadata


def test_no_module_imports_a_test_module():
    """Fixtures are shared through conftest.py and helpers through plain modules of tests/ (the
    suite once held together by 38 imports of other test modules, each building its fixtures)."""
    offenders = []
    for path in sources("tests", "tests_gpu", "benchmarks", "scripts"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if any(name.split(".")[-1].startswith("test_") for name in names):
                offenders.append(f"{path.relative_to(REPO)} imports {names}")
    assert offenders == []
