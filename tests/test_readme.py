"""README stays true: its commands exist, and it lists every weight file the code loads."""

import re
from pathlib import Path

from pulid.catalogue import CATALOGUE, markdown_table

README_PATH = Path(__file__).resolve().parent.parent / "README.md"
README = README_PATH.read_text()


def test_quick_start_commands():
    assert "bash scripts/setup_env.sh && .venv/bin/python app_flux.py" in README
    assert "bash scripts/setup_env.sh && .venv/bin/python app_flux.py --preset tiny-random" in README
    assert "bash scripts/setup_env.sh --cpu --test && .venv/bin/python -m pytest -q" in README
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "-m pytest -q" in ci and "setup_env.sh" in ci


def test_space_front_matter():
    front = README.split("---")[1]
    assert re.search(r"^sdk: gradio$", front, re.M) and re.search(r"^app_file: app_flux.py$", front, re.M)


def test_the_space_preloads_every_file_the_default_app_loads():
    """``preload_from_hub`` (downloaded at the Space's build) and ``models`` are the catalogue's
    files for the app's default flags, repository by repository, so no request waits for one."""
    import yaml

    from pulid.catalogue import DEFAULT_VERSION, required_weights

    front = yaml.safe_load(README.split("---")[1])
    needed: dict[str, set[str]] = {}
    for entry in required_weights("flux-dev", DEFAULT_VERSION, None, {}).values():
        needed.setdefault(entry.weights.repo_id, set()).update(entry.weights.files)
    preloaded = {}
    for line in front["preload_from_hub"]:
        repo, files = line.split(" ")
        preloaded[repo] = set(files.split(","))
    assert preloaded == needed
    assert set(front["models"]) == set(needed)
    assert front["suggested_hardware"] == "zero-a10g"  # the flavour name of ZeroGPU Spaces
    assert front["license"] == "apache-2.0"
    assert "Apache License" in (README_PATH.parent / "LICENSE").read_text()


def test_the_weights_table_is_the_catalogue():
    """README's table of weight files is made from pulid/catalogue.py and must stay identical."""
    table = markdown_table()
    assert table in README, "README's weights table is stale: paste pulid.catalogue.markdown_table()"
    for entry in CATALOGUE:  # every file the product can load has its row
        assert f"`models/{entry.weights.local_name}" in table


def test_the_models_folder_readme_names_every_file_of_the_catalogue():
    """models/README.md is what a user placing files by hand reads: no catalogue file is left out."""
    layout = (README_PATH.parent / "models" / "README.md").read_text()
    for entry in CATALOGUE:
        assert Path(entry.weights.local_name).name in layout, entry.weights.local_name


def test_the_download_help_for_small_cards_is_the_readmes():
    """The card lines of ``python -m pulid.serve.download --help`` are rows of README's table."""
    import pulid.serve.download

    lines = [line for line in pulid.serve.download.__doc__.splitlines() if "GB card" in line]
    assert lines
    for line in lines:
        flags = line.split("pulid.serve.download", 1)[1].split("#")[0].strip()
        assert flags in README, line


def test_the_limits_table_is_the_limits_module():
    from pulid import limits

    section = README.split("## Limits and safety")[1].split("## ")[0]
    assert f"| one uploaded file | {limits.MAX_UPLOAD_BYTES // 10**6} MB" in section
    assert f"| one request's body | {limits.MAX_JSON_BODY_BYTES // 10**6} MB of JSON" in section
    assert f"| one photo | {limits.MAX_IMAGE_PIXELS // 10**6} megapixels" in section
    assert f"| extra photos of the person | {limits.MAX_EXTRA_PHOTOS} " in section
    assert f"| images per request | {limits.MAX_IMAGES_PER_REQUEST} " in section
    assert f"| prompt, negative prompt | {limits.MAX_PROMPT_CHARS:,} characters" in section
    assert f"all visitors together | {limits.MAX_QUEUED} |" in section
    assert f"one visitor, running or waiting | {limits.MAX_QUEUED_PER_VISITOR} " in section
    per_hour, free = limits.MAX_UPLOAD_BYTES_PER_HOUR // 10**9, limits.MIN_FREE_DISK_BYTES // 10**9
    assert (
        f"| uploads of one visitor | {per_hour} GB an hour" in section and f"under {free} GB free" in section
    )


def test_the_layout_names_every_folder_and_module():
    """Every tracked top-level folder, and every module and sub-package of ``flux/``, ``pulid/``
    and ``pulid/serve/``, is in docs/architecture.md (README's Layout points there), so a new folder or
    module comes with its line."""
    import subprocess

    root = README_PATH.parent
    layout = (root / "docs" / "architecture.md").read_text()
    assert "docs/architecture.md" in README.split("## Layout", 1)[1]
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True)
    folders = {path.split("/", 1)[0] for path in tracked.stdout.splitlines() if "/" in path}
    missing = [f"{name}/" for name in sorted(folders) if f"`{name}/`" not in layout]
    for package in ("flux", "pulid", "pulid/serve"):
        for child in sorted((root / package).iterdir()):
            if child.name.startswith("_"):
                continue
            if child.suffix == ".py" and f"`{child.name}`" not in layout:
                missing.append(f"{package}/{child.name}")
            if child.is_dir() and (child / "__init__.py").is_file() and f"`{child.name}/`" not in layout:
                missing.append(f"{package}/{child.name}/")
    assert not missing, f"README's Layout does not name: {', '.join(missing)}"
