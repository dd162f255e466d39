"""The app over HTTP: gradio_client against the running app on the tiny preset, the CLI, --help."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app_flux
from pulid.outputs import read_png_metadata
from scripts.soak import free_port
from tiny_random.pipeline import tiny_face_analyzer, tiny_pipeline

REPO = Path(__file__).resolve().parent.parent
PHOTO = REPO / "example_inputs" / "astronaut.png"


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir):
    args = app_flux.parse_args(["--preset", "tiny-random", "--dev"])
    pipeline = tiny_pipeline(tmp_path_factory.mktemp("tiny"), tiny_face_analyzer(models_dir))
    demo = app_flux.create_demo(args, app_flux.make_service(pipeline, tmp_path_factory.mktemp("outputs")))
    port = free_port()
    app_flux.launch(demo, args, server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def settings(**kw):
    values = dict(
        prompt="portrait, color, cinematic",
        id_image=None,
        extra_images=[],
        id_weight=1.0,
        width=256,
        height=256,
        num_steps=2,
        start_step=0,
        guidance=4.0,
        seed="5",
        max_sequence_length=128,
        neg_prompt="",
        true_cfg=1.0,
        cfg_start_step=1,
    )
    values.update(kw)
    return values


def call(client, **kw):
    from gradio_client import handle_file

    values = settings(**kw)
    if values["id_image"] is not None:
        values["id_image"] = handle_file(str(values["id_image"]))
    values["extra_images"] = [handle_file(str(p)) for p in values["extra_images"]]
    return client.predict(**values, api_name="/generate")


def test_client_gets_an_image_and_the_used_seed(client):
    image, seed, png, gallery = call(client, id_image=PHOTO, seed="-1")
    assert int(seed) >= 0
    with Image.open(image) as img:
        assert img.size == (256, 256)
    meta = read_png_metadata(png)
    assert meta["seed"] == int(seed) and meta["num_id_images"] == 1
    assert len(gallery) == 3  # the --dev debug gallery: detected, aligned, parsed face


def test_same_seed_same_image_and_extra_photos(client):
    first = call(client, id_image=PHOTO, seed="9")
    again = call(client, id_image=PHOTO, seed="9")
    assert np.array_equal(np.asarray(Image.open(first[0])), np.asarray(Image.open(again[0])))
    with_extra = call(client, id_image=PHOTO, extra_images=[PHOTO], seed="9")
    assert read_png_metadata(with_extra[2])["num_id_images"] == 2


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(seed="abc"), r"Seed \(-1 for random\) must be a whole number"),
        (dict(width=1000), "Width must be a multiple of 16"),
        (dict(width=250), "less than minimum value 256"),
    ],
)
def test_bad_settings_get_a_clear_message_and_the_server_goes_on(client, kw, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        call(client, **kw)
    assert int(call(client)[1]) == 5


def test_help_lists_the_official_flags():
    out = subprocess.run(
        [sys.executable, "app_flux.py", "--help"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    for flag in [
        "--name",
        "--version",
        "--device",
        "--offload",
        "--aggressive_offload",
        "--fp8",
        "--onnx_provider",
        "--port",
        "--dev",
        "--pretrained_model",
        "--host",
        "--share",
        "--preset",
    ]:
        assert flag in out


def test_defaults_bind_localhost_without_share(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    args = app_flux.parse_args([])
    assert args.host == "127.0.0.1" and args.share is False and args.port == 8080
    assert args.name == "flux-dev" and args.version == "v0.9.1" and args.onnx_provider == "gpu"


def test_cli_writes_one_png_per_prompt_and_seed(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "generate.py",
            "--preset",
            "tiny-random",
            "--id_image",
            str(PHOTO),
            "--prompt",
            "a photo of a woman",
            "--prompt",
            "portrait",
            "--seed",
            "1",
            "--seed",
            "2",
            "--width",
            "256",
            "--height",
            "256",
            "--num_steps",
            "2",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = sorted(out.glob("*.png"))
    assert len(files) == 4
    metas = [read_png_metadata(f) for f in files]
    assert sorted((m["prompt"], m["seed"]) for m in metas) == [
        ("a photo of a woman", 1),
        ("a photo of a woman", 2),
        ("portrait", 1),
        ("portrait", 2),
    ]
    assert "2/2" in proc.stderr  # the per-step progress bar


def start_without_weights(tmp_path, **env):
    """Run the app as a new user would, with an empty models folder; time it."""
    import time

    environment = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    environment.update(HF_HOME=str(tmp_path / "hf"), **env)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "app_flux.py", "--models_dir", str(tmp_path / "models"), "--device", "cpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )
    return proc, time.perf_counter() - start


@pytest.fixture
def silent_endpoint():
    """A port that accepts connections and never answers: a hub behind a dropping firewall."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


@pytest.mark.parametrize("case", ["offline-flag", "refused", "silent"])
def test_a_start_without_weights_lists_every_file_at_once_within_seconds(tmp_path, case, request):
    from pulid.catalogue import required_weights

    env, reason = {
        "offline-flag": ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
        "refused": ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "hub cannot be reached"),
        "silent": ({"HF_ENDPOINT": request.getfixturevalue("silent_endpoint")}, "hub cannot be reached"),
    }[case]
    proc, seconds = start_without_weights(tmp_path, **env)
    assert proc.returncode == 1 and seconds < 10, (seconds, proc.stderr[-2000:])
    message = proc.stderr
    assert reason in message and "Traceback" not in message and "Retrying" not in message
    for entry in required_weights().values():
        assert str(tmp_path / "models" / entry.weights.local_name) in message
    assert "python -m pulid.download" in message and message.count("HF_TOKEN") == 2


def test_flags_reach_the_loader(monkeypatch):
    import pulid.loading
    from flux.offload import MemoryPolicy
    from pulid.startup import build_pipeline

    seen = {}
    monkeypatch.setattr(
        pulid.loading, "load_pipeline", lambda *args, **kwargs: seen.update(args=args, **kwargs)
    )
    build_pipeline(
        app_flux.parse_args(
            [
                "--name",
                "flux-krea-dev",
                "--version",
                "v0.9.0",
                "--device",
                "cuda:1",
                "--fp8",
                "--fp8_mode",
                "native",
                "--compile",
                "--vram_budget",
                "12",
                "--onnx_provider",
                "cpu",
                "--pretrained_model",
                "p.safetensors",
            ]
        )
    )
    assert seen["args"] == ("flux-krea-dev", "v0.9.0", "cuda:1")
    assert seen["fp8"] == "native" and seen["compiled"] is True
    assert seen["memory"] == MemoryPolicy(vram_budget_gb=12.0)
    assert seen["onnx_provider"] == "cpu" and seen["pretrained_model"] == "p.safetensors"
    build_pipeline(app_flux.parse_args(["--aggressive_offload", "--device", "cuda"]))
    assert seen["memory"] == MemoryPolicy(offload=True, aggressive=True) and seen["fp8"] is None


@pytest.mark.parametrize("value", ["nan", "inf", "-4", "0", "lots"])
def test_a_hostile_vram_budget_is_refused_by_the_parser(value, capsys):
    with pytest.raises(SystemExit):
        app_flux.parse_args(["--vram_budget", value])
    assert "--vram_budget" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="what a machine without CUDA answers")
def test_a_flag_the_machine_cannot_honour_stops_the_start_with_one_message(tmp_path):
    for flags, message in [
        (["--device", "cuda"], "--device cuda needs a CUDA build of PyTorch"),
        (["--device", "cpu", "--fp8", "--fp8_mode", "native"], "fp8 matrix units"),
        (["--device", "cpu", "--vram_budget", "12"], "--vram_budget 12 moves weights"),
        (["--device", "cpu", "--offload"], "--offload moves weights"),
    ]:
        proc = subprocess.run(
            [sys.executable, "app_flux.py", "--models_dir", str(tmp_path), *flags],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-1500:]
        assert "Traceback" not in proc.stderr
