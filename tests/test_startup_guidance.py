"""What a start says on a machine it does not fit: no CUDA GPU, a misspelt models folder, a disk
too small for the download, fp8 without fp8 units (issue 31, item 6)."""

import logging

import pytest
import torch

from pulid.serve import gradio_app

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without CUDA says")


def test_a_cpu_start_without_weights_points_at_the_tiny_preset_first(tmp_path, monkeypatch):
    from pulid.serve.startup import load_or_exit

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    typo = tmp_path / "modles"
    with pytest.raises(SystemExit) as stop:
        load_or_exit(gradio_app.parse_args(["--models_dir", str(typo)]))
    said = str(stop.value.code)
    first_download = said.index("Cannot start:")
    assert 0 < said.index("--preset tiny-random") < first_download  # before any download advice
    assert said.index(f"--models_dir {typo} does not exist (a typo?)") < first_download
    assert not typo.exists()  # made only by a download


def test_the_download_checks_the_disk_first_and_names_a_new_folder(tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    import pulid.serve.download

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100 * 10**9, 99 * 10**9, 10**9))
    fetched = []
    monkeypatch.setattr(pulid.serve.download, "download", lambda *a, **k: fetched.append(a))
    folder = tmp_path / "new-models"
    assert pulid.serve.download.main(["--models_dir", str(folder)]) == 1
    out, err = capsys.readouterr()
    assert f"{folder} does not exist yet: it is made when the download starts" in out
    assert "Not enough disk space: 37.9 GB to download" in err and "1.0 GB free there" in err
    assert fetched == [] and not folder.exists()


def test_fp8_on_a_machine_without_fp8_units_says_what_it_will_do(caplog):
    from pulid.loading import resolve_fp8_mode

    caplog.set_level(logging.WARNING, logger="pulid.loading")
    assert resolve_fp8_mode("auto", torch.device("cpu")) == "quanto"
    assert "loads XLabs' fp8 checkpoint through optimum-quanto" in caplog.text
    assert "no faster" in caplog.text


def test_a_second_setup_with_nothing_to_do_runs_neither_pip_nor_the_import_check():
    """README's commands re-ran the whole setup each time: 30-100 s of import checks, and pip
    again for the app after the test setup (a stamp per flag set)."""
    import subprocess
    import sys
    from pathlib import Path

    venv = Path(sys.prefix)
    if not (venv / ".setup_env-cpu1-test1.sha256").is_file():
        pytest.skip("this environment was not made by scripts/setup_env.sh --cpu --test")
    repo = Path(__file__).resolve().parent.parent
    for flags in (["--cpu", "--test"], ["--cpu"]):  # the test setup, then the app's
        done = subprocess.run(
            ["bash", "scripts/setup_env.sh", "--venv", str(venv), *flags],
            cwd=repo,
            env={"PATH": "/usr/bin:/bin", "SKIP_CHROMIUM": "1"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0 and "python packages up to date" in done.stdout, done.stdout
        assert "pip install" not in done.stdout and "imports OK" not in done.stdout
