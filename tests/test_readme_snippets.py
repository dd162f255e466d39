"""README's Python snippet runs as printed, from outside the repository after the package is
installed (its HTTP snippet runs against the app in test_app.py)."""

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PHOTO = REPO / "example_inputs" / "astronaut.png"


def python_blocks() -> list[str]:
    """Every ```python block of README.md, dedented (they sit inside list items)."""
    text = (REPO / "README.md").read_text()
    return [textwrap.dedent(block) for block in re.findall(r"```python\n(.*?)\n\s*```", text, re.S)]


def block_with(marker: str) -> str:
    (block,) = [block for block in python_blocks() if marker in block]
    return block


def test_the_python_snippet_runs_as_printed_in_this_process(tmp_path, monkeypatch, capsys):
    """The fast tier's sibling of the test below: the same block, from another folder, without
    installing the package first."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(PHOTO, work / "me.jpg")
    monkeypatch.chdir(work)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    exec(compile(block_with("tiny_pipeline_with_face_models"), "README.md", "exec"), {})
    assert (work / "out.png").is_file()
    assert re.fullmatch(r"(-?\d\.\d\d|no face found)\n", capsys.readouterr().out)


@pytest.mark.slow  # installs the package into a folder and starts a new Python
def test_the_python_snippet_runs_as_printed_outside_the_repository(tmp_path):
    """It failed three ways: no module 'flux' outside the repository, "cuda" on a CPU, and
    save_image used without its import, after the whole generation."""
    installed = tmp_path / "installed"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
        + ["--target", str(installed), str(REPO)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copy(PHOTO, work / "me.jpg")
    env = {**os.environ, "PYTHONPATH": str(installed), "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", block_with("tiny_pipeline_with_face_models")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (work / "out.png").is_file()
    assert re.fullmatch(r"(-?\d\.\d\d|no face found)\n", done.stdout), done.stdout
