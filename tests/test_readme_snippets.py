"""README's code runs as printed: the Python API snippet from outside the repository after the
package is installed, and the HTTP API snippet against the running app."""

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.test_app import PHOTO, server  # noqa: F401 (the running app fixture)

REPO = Path(__file__).resolve().parent.parent


def python_blocks() -> list[str]:
    """Every ```python block of README.md, dedented (they sit inside list items)."""
    text = (REPO / "README.md").read_text()
    return [textwrap.dedent(block) for block in re.findall(r"```python\n(.*?)\n\s*```", text, re.S)]


def block_with(marker: str) -> str:
    (block,) = [block for block in python_blocks() if marker in block]
    return block


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


def test_the_http_snippet_runs_as_printed_against_the_app(server):  # noqa: F811
    block = block_with("from gradio_client import").replace("http://127.0.0.1:8080/", server)
    done = subprocess.run(
        [sys.executable, "-c", block], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if not line.startswith("Loaded as API")]
    assert [line.split()[1] for line in lines] == ["42", "43"], done.stdout
    assert all(re.fullmatch(r"-?\d\.\d\d|None", line.split()[2]) for line in lines)  # two decimals
