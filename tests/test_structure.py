"""The layering and the fresh-clone promises, checked on the source itself.

- ``flux`` (the model library) never imports ``pulid``, the app or the fixtures;
- the product packages never import the fixtures (``tiny_random``), except the start-up code for
  the ``--preset tiny-random`` it offers;
- ``generate.py`` does not import the Gradio app;
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

REPO = Path(__file__).resolve().parent.parent
# Ways of naming the shared folder that sits beside the repository on the project's own machines
# (spelled in pieces so that this file does not name it itself).
SHARED = "sha" + "red"
OUTSIDE_FOLDERS = (f"../{SHARED}", f"/work/{SHARED}", f'parents[2] / "{SHARED}"')


def imported_modules(path: Path) -> set[str]:
    """Every module a Python file imports, at any level of its code (lazy imports included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def sources(*parts: str) -> list[Path]:
    return sorted(p for part in parts for p in (REPO / part).rglob("*.py")) if parts else []


def top_level(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("package", ["flux", "eva_clip"])
def test_lower_layers_import_nothing_above_them(package):
    for path in sources(package):
        above = {top_level(m) for m in imported_modules(path)} & {
            "pulid",
            "tiny_random",
            "app_flux",
            "generate",
        }
        assert not above, f"{path.relative_to(REPO)} imports {sorted(above)}"


def test_the_packages_do_not_import_the_front_ends():
    for path in sources("pulid", "flux", "eva_clip"):
        front = {top_level(m) for m in imported_modules(path)} & {"app_flux", "generate"}
        assert not front, f"{path.relative_to(REPO)} imports {sorted(front)}"


def test_product_code_leaves_the_fixtures_to_the_preset():
    for path in [*sources("pulid", "flux", "eva_clip"), REPO / "app_flux.py", REPO / "generate.py"]:
        uses = {m for m in imported_modules(path) if top_level(m) == "tiny_random"}
        if path.name == "startup.py":  # --preset tiny-random
            assert uses == {"tiny_random.pipeline"}
        else:
            assert not uses, f"{path.relative_to(REPO)} imports the fixtures {sorted(uses)}"


def test_the_command_line_does_not_import_the_gradio_app():
    modules = {top_level(m) for m in imported_modules(REPO / "generate.py")}
    assert not modules & {"app_flux", "gradio"}


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
        "eva_clip/model.py",
        "tiny_random/face_models.py",
    ):
        assert module in names, module
    assert not any(n.startswith(("tests/", "benchmarks/", "models/")) for n in names)
    for script in (
        "pulid-flux = app_flux:main",
        "pulid-flux-generate = generate:main",
        "pulid-flux-download = pulid.download:main",
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
