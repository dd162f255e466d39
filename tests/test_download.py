"""``python -m pulid.serve.download``: what the flags need, where it goes, fetching only what is missing."""

import subprocess
import sys
from pathlib import Path

import pytest

import pulid.serve.download
from flux.hub import format_size
from pulid.catalogue import CATALOGUE, required_weights

REPO = Path(__file__).resolve().parent.parent


def test_dry_run_lists_every_file_with_size_and_place(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pulid.serve.download",
            "--dry-run",
            "--models_dir",
            str(tmp_path),
            "--version",
            "v0.9.0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    needed = required_weights("flux-dev", "v0.9.0")
    for entry in needed.values():
        line = next(
            line for line in proc.stdout.splitlines() if str(tmp_path / entry.weights.local_name) in line
        )
        assert line.startswith("missing") and format_size(entry.weights.size_bytes) in line
    total = sum(e.weights.size_bytes for e in needed.values())
    assert f"{len(needed)} to download ({format_size(total)})" in proc.stdout
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


@pytest.fixture
def fake_hub(monkeypatch):
    """huggingface_hub's download, writing a small file where the real one would land."""
    import huggingface_hub

    monkeypatch.setattr(pulid.serve.download, "download_blocked", lambda: None)  # as if online
    fetched = []

    def fake_download(repo_id, filename, local_dir=None, **kwargs):
        fetched.append((repo_id, filename))
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"weights")
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    return fetched


def test_fetches_what_is_missing_into_its_place_then_nothing(tmp_path, fake_hub, capsys):
    (tmp_path / "ae.safetensors").write_bytes(b"already here")
    assert pulid.serve.download.main(["--models_dir", str(tmp_path), "--name", "flux-krea-dev"]) == 0
    needed = required_weights("flux-krea-dev")
    for entry in needed.values():
        weights = entry.weights
        place = tmp_path / weights.local_name
        if weights.folder:
            assert all((place / name).read_bytes() == b"weights" for name in weights.files)
        else:
            assert place.read_bytes() == b"weights", place
    assert ("black-forest-labs/FLUX.1-Krea-dev", "ae.safetensors") in fake_hub  # lands as krea-ae.safetensors
    assert (tmp_path / "ae.safetensors").read_bytes() == b"already here"  # flux-dev's, untouched
    fake_hub.clear()
    assert pulid.serve.download.main(["--models_dir", str(tmp_path), "--name", "flux-krea-dev"]) == 0
    assert fake_hub == [] and "0 to download" in capsys.readouterr().out


def test_an_empty_file_is_fetched_again_and_a_folder_in_its_place_is_named(tmp_path, fake_hub, capsys):
    (tmp_path / "ae.safetensors").write_bytes(b"")  # a download cut off at once
    (tmp_path / "flux1-dev.safetensors").mkdir()  # a folder named like the file
    (tmp_path / "xflux_text_encoders").write_bytes(b"x")  # a file where a folder belongs
    assert pulid.serve.download.main(["--models_dir", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "ae.safetensors is empty (a download that was cut off?)" in out
    assert "flux1-dev.safetensors is a folder where the file belongs: remove it" in out
    assert "xflux_text_encoders is a file where a folder belongs: remove it" in out
    assert out.count("\nbroken ") == 3
    assert pulid.serve.download.main(["--models_dir", str(tmp_path)]) == 1  # two cannot be fetched over
    assert (tmp_path / "ae.safetensors").read_bytes() == b"weights"  # the empty one was
    assert "flux1-dev.safetensors is a folder where the file belongs: remove it" in capsys.readouterr().err
    assert (tmp_path / "flux1-dev.safetensors").is_dir()  # nothing was moved into it


def test_the_missing_list_says_what_is_in_a_files_place(tmp_path):
    from flux.hub import how_to_get

    (tmp_path / "ae.safetensors").mkdir()
    (ae,) = [
        e.weights for e in required_weights("flux-dev").values() if e.weights.local_name == "ae.safetensors"
    ]
    assert f"now: {tmp_path / 'ae.safetensors'} is a folder where the file belongs: remove it" in how_to_get(
        ae, tmp_path
    )


def test_a_speed_lora_asked_twice_is_listed_once_and_not_as_optional(tmp_path, capsys):
    name = "FLUX.1-Turbo-Alpha"
    argv = ["--dry-run", "--speed_lora", name, "--speed_lora", name, "--models_dir", str(tmp_path)]
    assert pulid.serve.download.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if name in line]
    assert len(rows) == 1 and rows[0].startswith("missing ")


def test_fp8_mode_alone_asks_for_fp8(tmp_path, capsys):
    assert (
        pulid.serve.download.main(["--dry-run", "--fp8_mode", "quanto", "--models_dir", str(tmp_path)]) == 0
    )
    out = capsys.readouterr().out
    assert "flux-dev-fp8.safetensors" in out and "flux1-dev.safetensors" not in out


def test_quanto_fp8_needs_xlabs_file_and_all_lists_the_whole_catalogue(tmp_path, capsys):
    assert (
        pulid.serve.download.main(
            ["--dry-run", "--fp8", "--fp8_mode", "quanto", "--models_dir", str(tmp_path)]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "flux-dev-fp8.safetensors" in out and "flux1-dev.safetensors" not in out
    assert "optional" in out  # the quantization map: the built-in one replaces it
    assert pulid.serve.download.main(["--dry-run", "--all", "--models_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert all(str(tmp_path / entry.weights.local_name) in out for entry in CATALOGUE)


def test_offline_says_so_and_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert pulid.serve.download.main(["--models_dir", str(tmp_path)]) == 1
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err


def test_a_speed_lora_downloads_into_models_loras_under_its_name(tmp_path, fake_hub):
    from pulid.catalogue import SPEED_LORAS
    from pulid.loras import LoRALibrary

    turbo = SPEED_LORAS["FLUX.1-Turbo-Alpha"].entry.weights
    for entry in required_weights().values():  # everything else is already there
        place = tmp_path / entry.weights.local_name
        for name in entry.weights.files if entry.weights.folder else [None]:
            target = place / name if name else place
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"x")
    assert (
        pulid.serve.download.main(["--models_dir", str(tmp_path), "--speed_lora", "FLUX.1-Turbo-Alpha"]) == 0
    )
    assert fake_hub == [(turbo.repo_id, turbo.filename)]
    assert (tmp_path / "loras" / "FLUX.1-Turbo-Alpha.safetensors").read_bytes() == b"weights"
    library = LoRALibrary(tmp_path / "loras", {}, models_dir=tmp_path, allow_download=False)
    assert library.resolve("FLUX.1-Turbo-Alpha") == tmp_path / "loras" / "FLUX.1-Turbo-Alpha.safetensors"
    assert "FLUX.1-Turbo-Alpha" in library.names() and "FLUX.1-Turbo-Alpha.safetensors" not in library.names()


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--name", "flux-krea-dev", "--fp8", "--fp8_mode", "quanto"],
            "no fp8 (quanto) checkpoint for flux-krea-dev",
        ),
        (["--dit", "bogus"], "--dit 'bogus' is neither one of"),
        (["--dit", "flux-dev-Q8_0", "--fp8"], "--fp8 quantises the bf16 checkpoint"),
        (["--t5", "/no/such/t5.gguf"], "--t5 /no/such/t5.gguf: there is no such file"),
    ],
)
def test_flags_that_cannot_be_planned_get_one_line_not_a_traceback(tmp_path, capsys, flags, message):
    assert pulid.serve.download.main(["--dry-run", "--models_dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Cannot plan the download: ") and message in err and "Traceback" not in err


def test_a_file_given_as_a_path_is_checked_and_not_fetched(tmp_path, capsys):
    from pulid.catalogue import required_weights

    mine = tmp_path / "my-flux.gguf"
    mine.write_bytes(b"GGUF")
    assert pulid.serve.download.main(["--dry-run", "--models_dir", str(tmp_path), "--dit", str(mine)]) == 0
    out = capsys.readouterr().out
    assert required_weights()["dit"].weights.description not in out  # the 23.8 GB DiT is not planned
    assert required_weights()["ae"].weights.description in out  # the rest is
