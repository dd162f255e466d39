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
from pulid.service import GenerationService
from pulid.tiny import tiny_face_analyzer, tiny_pipeline
from scripts.soak import free_port

REPO = Path(__file__).resolve().parent.parent
PHOTO = REPO / "example_inputs" / "astronaut.png"


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir):
    args = app_flux.parse_args(["--preset", "tiny-random", "--dev"])
    pipeline = tiny_pipeline(tmp_path_factory.mktemp("tiny"), tiny_face_analyzer(models_dir))
    demo = app_flux.create_demo(args, GenerationService(pipeline, tmp_path_factory.mktemp("outputs")))
    port = free_port()
    demo.launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        max_file_size=app_flux.MAX_UPLOAD,
    )
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
    return client.predict(*values.values(), api_name="/generate")


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
        (dict(seed="abc"), "Seed must be a whole number"),
        (dict(width=1000), "width must be a multiple of 16"),
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


def test_missing_weights_stop_the_app_with_the_message_and_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "app_flux.py", "--models_dir", str(tmp_path), "--device", "cpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "flux1-dev.safetensors" in proc.stderr and "HF_TOKEN" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_flags_reach_the_loader(monkeypatch):
    import pulid.loading

    seen = {}
    monkeypatch.setattr(
        pulid.loading, "load_pipeline", lambda *args, **kwargs: seen.update(args=args, **kwargs)
    )
    app_flux.build_pipeline(
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
    assert seen["fp8"] == "native" and seen["compile_blocks"] is True and seen["vram_budget_gb"] == 12.0
    assert seen["onnx_provider"] == "cpu" and seen["pretrained_model"] == "p.safetensors"
    app_flux.build_pipeline(app_flux.parse_args(["--aggressive_offload", "--device", "cuda"]))
    assert seen["aggressive_offload"] is True and seen["offload"] is True and seen["fp8"] is None
