"""The app over HTTP: gradio_client against the running app on the tiny preset, the CLI, --help."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pulid.outputs import read_a1111_parameters, read_image_metadata
from pulid.request import generation_settings
from pulid.serve import components, gradio_app, page
from scripts.soak import free_port
from tests.app_requests import PHOTO, call

REPO = Path(__file__).resolve().parent.parent


def test_client_gets_an_image_and_the_used_seed(client, caplog):
    import logging
    import time

    from pulid.request import RANDOM_SEEDS

    caplog.set_level(logging.INFO, logger="pulid.serve")
    reply = call(client, id_image=PHOTO, seed="-1")
    for _ in range(100):  # written as the handler ends, just after the reply
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request from")]
        if lines:
            break
        time.sleep(0.05)
    # one line on the server's console per request: who, what, how it ended, how long
    assert lines and lines[0].startswith("request from 127.0.0.1 (256x256, 2 steps, 1 image(s), 1 photo(s)):")
    assert ": made 1 image(s), after " in lines[0] and len(lines) == 1
    assert 0 <= reply.seed < RANDOM_SEEDS  # a random seed of at most 10 digits, to read and type
    score = reply.details[0]["face_similarity"]
    assert score is not None and score == round(score, 2)  # two decimals, where it was 17
    assert "typically score above about 0.4" in reply.info and "the number means nothing" in reply.info
    with Image.open(reply.gallery[0]["image"]) as img:
        assert img.size == (256, 256)
    meta = read_image_metadata(reply.image)
    assert meta["seed"] == reply.seed and meta["num_id_images"] == 1
    assert len(reply.debug) == 3  # the --dev debug gallery: detected, aligned, parsed face
    assert reply.details[0]["settings"]["seed"] == reply.seed
    assert f"seed {reply.seed}" in reply.gallery[0]["caption"] and "face similarity" in reply.info


def test_images_saved_outside_the_working_and_temp_folders_reach_the_page(client, outside_folder):
    """gradio refused every image of an --outputs_dir outside those two (a Space's /data): the
    visitor got a bare "Error". The server fixture keeps its outputs in such a folder."""
    reply = call(client, id_image=PHOTO, seed="3")
    (saved,) = outside_folder.glob(f"outputs-*/{reply.details[0]['file']}")
    assert Path(reply.image).read_bytes() == saved.read_bytes()  # the file with its settings inside


def test_same_seed_same_image_and_extra_photos(client):
    first = call(client, id_image=PHOTO, seed="9")
    again = call(client, id_image=PHOTO, seed="9")
    assert np.array_equal(np.asarray(Image.open(first.image)), np.asarray(Image.open(again.image)))
    with_extra = call(client, id_image=PHOTO, extra_images=[PHOTO], seed="9")
    assert read_image_metadata(with_extra.image)["num_id_images"] == 2


def test_a_batch_gives_consecutive_seeds_each_the_image_its_seed_gives_alone(client):
    batch = call(client, id_image=PHOTO, seed="20", num_images=3)
    assert batch.seeds == [20, 21, 22] and len(batch.files) == 3 and len(batch.gallery) == 3
    alone = call(client, id_image=PHOTO, seed="21")
    second = np.asarray(Image.open(batch.files[1]), np.int16)
    difference = np.abs(second - np.asarray(Image.open(alone.image), np.int16))
    assert difference.max() <= 2, difference.max()  # batched float32 matmuls: at most rounding


def test_no_id_photo_is_said_plainly_and_recorded(client):
    reply = call(client, seed="4")
    assert "plain FLUX.1-dev" in reply.info
    assert reply.details[0]["face_similarity"] is None
    assert read_image_metadata(reply.image)["face_similarity"] == "no ID photo"


@pytest.mark.parametrize("fmt, suffix", [("jpeg", ".jpg"), ("webp", ".webp")])
def test_jpeg_and_webp_outputs_keep_the_settings(client, fmt, suffix):
    reply = call(client, id_image=PHOTO, seed="6", output_format=fmt, quality=80)
    assert reply.image.endswith(suffix)
    assert read_image_metadata(reply.image)["seed"] == 6
    assert "Seed: 6" in read_a1111_parameters(reply.image)


def test_the_api_marks_optional_inputs_and_shows_no_remote_example(client):
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(info) >= {"/generate", "/cancel"}
    parameters = {p["parameter_name"]: p for p in info["/generate"]["parameters"]}
    assert list(parameters) == components.input_names()
    assert (
        parameters["id_image"]["parameter_has_default"]
        and parameters["extra_images"]["parameter_has_default"]
    )
    assert "pdf" not in str(parameters["extra_images"]).lower()


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(seed="abc"), r"Seed \(-1 for random\) must be a whole number"),
        (dict(width=1000), "Width must be a multiple of 16"),
        (dict(width=250), r"Width must be a multiple of 16 from 256 to 1536 \(got 250\)"),
        (dict(num_steps=-1), r"Number of steps must be a whole number from 1 to 50"),
        (
            dict(num_steps="abc"),
            r"Number of steps must be a whole number .* \(got 'abc'\)",
        ),  # gradio: a TypeError
        (dict(guidance="nan"), "Guidance must be a number from 1 to 10"),
    ],
)
def test_bad_settings_get_a_clear_message_and_the_server_goes_on(client, kw, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        call(client, **kw)
    assert call(client).seed == 5


def test_a_listed_lora_changes_the_image_and_is_recorded(client):
    plain = call(client, id_image=PHOTO, seed="9")
    styled = call(client, id_image=PHOTO, seed="9", lora_1="tiny-style.safetensors", lora_1_strength=0.8)
    assert not np.array_equal(np.asarray(Image.open(plain.image)), np.asarray(Image.open(styled.image)))
    meta = read_image_metadata(styled.image)
    assert [(lora["name"], lora["strength"]) for lora in meta["loras"]] == [("tiny-style", 0.8)]
    assert meta["lora_mode"] == "merged"
    assert "LoRAs: tiny-style (0.8), merged." in styled.info
    parameters = read_a1111_parameters(styled.image)
    assert "<lora:tiny-style:0.8>" in parameters and "Lora hashes" in parameters
    again = call(client, id_image=PHOTO, seed="9")  # the LoRA left nothing behind
    assert np.array_equal(np.asarray(Image.open(plain.image)), np.asarray(Image.open(again.image)))


def test_the_step_cache_says_how_many_steps_ran_in_full(client):
    reply = call(client, id_image=PHOTO, num_steps=6, cache_threshold=0.5)
    meta = read_image_metadata(reply.image)
    assert meta["cache_threshold"] == 0.5 and meta["cache_full_steps"].endswith(" of 6")
    assert f"Step cache: {meta['cache_full_steps']} steps ran in full" in reply.info


@pytest.mark.parametrize(
    "name", ["../loras/tiny-style.safetensors", "/etc/hostname", "someone/repo/x.safetensors"]
)
def test_a_lora_the_app_does_not_list_is_refused(client, name):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=r"^LoRA 2 must be one of the listed choices \(got '"):
        call(client, lora_2=name)


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


def test_cli_refuses_a_lora_that_is_not_there_before_loading_any_model(monkeypatch, capsys, tmp_path):
    from pulid.serve import cli

    def no_loading(*_, **__):
        raise AssertionError("the models were loaded before the LoRA was checked")

    monkeypatch.setattr(cli, "load_or_exit", no_loading)
    argv = ["--models_dir", str(tmp_path), "--prompt", "x", "--id_image", str(PHOTO), "--out", str(tmp_path)]
    assert cli.main([*argv, "--lora", "nope.safetensors"]) == 2
    assert "--lora: LoRA 'nope.safetensors' was not found" in capsys.readouterr().err


def test_cli_refuses_seeds_whose_images_overlap(capsys):
    from pulid.serve import cli

    with pytest.raises(SystemExit):
        cli.parse_args(["--prompt", "x", "--seed", "1", "--seed", "2", "--num_images", "2"])
    assert "--seed 1 and --seed 2 with --num_images 2 both make seed 2" in capsys.readouterr().err
    apart = cli.parse_args(
        ["--prompt", "x", "--prompt", "y", "--seed", "1", "--seed", "3", "--num_images", "2"]
    )
    made = [(r.prompt, seed) for r in apart.requests for seed in r.seeds(r.seed)]
    assert len(made) == len(set(made)) == 8  # two prompts x seeds 1, 2, 3, 4


def test_cli_takes_loras_and_speed_presets():
    from pulid.serve import cli

    args = cli.parse_args(["--prompt", "x", "--lora", "a.safetensors:0.5", "--lora", "o/r/b.safetensors"])
    loras = args.requests[0].loras
    assert [(c.source, c.strength) for c in loras] == [("a.safetensors", 0.5), ("o/r/b.safetensors", 1.0)]
    speed = cli.parse_args(["--prompt", "x", "--speed_lora", "Hyper-FLUX.1-dev-8steps"])
    request = speed.requests[0]
    assert (request.num_steps, request.guidance) == (8, 3.5)
    assert [(c.source, c.strength) for c in request.loras] == [("Hyper-FLUX.1-dev-8steps", 0.125)]
    mine = cli.parse_args(["--prompt", "x", "--speed_lora", "FLUX.1-Turbo-Alpha", "--num_steps=10"])
    assert mine.requests[0].num_steps == 10 and mine.requests[0].guidance == 3.5
    # however the user spells the flag (argparse takes unique prefixes), what they gave wins
    short = cli.parse_args(
        ["--prompt", "x", "--speed_lora", "FLUX.1-Turbo-Alpha", "--num_step", "20", "--guid", "2"]
    )
    assert (short.requests[0].num_steps, short.requests[0].guidance) == (20, 2.0)
    plain = cli.parse_args(["--prompt", "x"])
    declared = {s.name: s.default for s in generation_settings()}
    assert (plain.requests[0].num_steps, plain.requests[0].width) == (
        declared["num_steps"],
        declared["width"],
    )
    with pytest.raises(SystemExit):  # a hostile strength stops at the parser, with the range
        cli.parse_args(["--prompt", "x", "--lora", "a.safetensors:1e9"])


def test_cli_applies_a_lora_and_says_so(tmp_path, run_cli):
    flags = ["--prompt", "p", "--seed", "3", "--width", "256", "--height", "256", "--num_steps", "1"]
    proc = run_cli(*flags, "--lora", "tiny-style.safetensors:0.5", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lora=tiny-style:0.5" in proc.stdout
    (image,) = (tmp_path / "out").glob("*.png")
    assert read_image_metadata(image)["loras"][0]["strength"] == 0.5


def test_the_api_and_the_cli_start_from_a_photo(client, tmp_path, run_cli):
    plain = call(client, id_image=PHOTO, seed="5")
    started = call(client, id_image=PHOTO, seed="5", init_image=PHOTO, strength=0.5)
    meta = read_image_metadata(started.image)
    assert meta["strength"] == 0.5 and meta["init_image"].startswith("sha256:")
    assert meta["init_image_fit"] == "resized to 256x256"  # the 512x512 example photo
    assert "init_image" not in read_image_metadata(plain.image)
    with Image.open(plain.image) as a, Image.open(started.image) as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))

    flags = ["--prompt", "p", "--seed", "5", "--width", "256", "--height", "256", "--num_steps", "2"]
    out = tmp_path / "out"
    proc = run_cli(*flags, "--init_image", str(PHOTO), "--strength", "0.5", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (image,) = out.glob("*.png")
    assert read_image_metadata(image)["init_image"] == meta["init_image"]
    missing = run_cli(*flags, "--init_image", str(tmp_path / "nope.png"), "--out", str(out))
    assert missing.returncode == 2 and "--init_image" in missing.stderr and "nope.png" in missing.stderr

    mask = tmp_path / "mask.png"
    painted = np.zeros((64, 64), np.uint8)
    painted[16:48, 16:48] = 255
    Image.fromarray(painted).save(mask)
    inpainted = tmp_path / "inpainted"
    proc = run_cli(*flags, "--init_image", str(PHOTO), "--mask", str(mask), "--out", str(inpainted))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (image,) = inpainted.glob("*.png")
    stored = read_image_metadata(image)
    through_api = call(client, id_image=PHOTO, seed="5", init_image=PHOTO, mask=mask, strength=0.5)
    assert read_image_metadata(through_api.image)["mask"] == stored["mask"]
    assert (
        stored["mask"].startswith("sha256:")
        and stored["mask_fit"] == "resized from 64x64 to the photo's 512x512"
    )
    alone = run_cli(*flags, "--mask", str(mask), "--out", str(inpainted))
    assert alone.returncode == 2 and "A mask needs a photo to start from" in alone.stderr


def test_defaults_bind_localhost_without_share(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    args = gradio_app.parse_args([])
    assert args.host == "127.0.0.1" and args.share is False and args.port == 8080
    assert args.name == "flux-dev" and args.version == "v0.9.1" and args.onnx_provider == "auto"


def test_cli_writes_one_png_per_prompt_and_seed(tmp_path):
    """The one real start of ``generate.py`` (the others run its ``main`` in this process)."""
    out = tmp_path / "out"
    proc = start_cli(
        tmp_path,
        *("--id_image", str(PHOTO), "--prompt", "a photo of a woman", "--prompt", "portrait"),
        *("--seed", "1", "--seed", "2", "--width", "256", "--height", "256", "--num_steps", "2"),
        *("--out", str(out), "--cache_threshold", "0.5"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = sorted(out.glob("*.png"))
    assert len(files) == 4
    metas = [read_image_metadata(f) for f in files]
    assert sorted((m["prompt"], m["seed"]) for m in metas) == [
        ("a photo of a woman", 1),
        ("a photo of a woman", 2),
        ("portrait", 1),
        ("portrait", 2),
    ]
    assert "2/2" in proc.stderr  # the per-step progress bar
    lines = [line for line in proc.stdout.splitlines() if "seed=" in line]
    assert len(lines) == 4 and all("face_similarity=" in line for line in lines)
    for line in lines:  # "<file>  seed=1  face_similarity=0.12  0.3s": what the file records
        meta = read_image_metadata(line.split()[0])
        assert f"seed={meta['seed']} " in line and f"face_similarity={meta['face_similarity']} " in line
        assert f"full_steps={meta['cache_full_steps'].replace(' of ', '/')} " in line  # the step cache's work


def start_cli(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    """``generate.py --preset tiny-random`` with ``flags`` in a new process, its temporary files
    under ``tmp_path``."""
    return subprocess.run(
        [sys.executable, "generate.py", "--preset", "tiny-random", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        timeout=300,
    )


def start_without_weights(tmp_path, **env):
    """Run the app as a new user would, with an empty models folder."""
    environment = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    environment.update(HF_HOME=str(tmp_path / "hf"), **env)
    return subprocess.run(
        [sys.executable, "app_flux.py", "--models_dir", str(tmp_path / "models"), "--device", "cpu"]
        + ["--port", str(free_port())],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )


@pytest.fixture
def silent_endpoint():
    """A port that accepts connections and never answers: a hub behind a dropping firewall."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


@pytest.mark.slow  # three new processes; test_pipeline_loading.py reads the same message in this one
@pytest.mark.parametrize("case", ["offline-flag", "refused", "silent"])
def test_a_start_without_weights_lists_every_file_at_once(tmp_path, case, request):
    """Offline, refused or silent, the hub costs no retries: the message comes at once (the
    process is given 120 s; it takes 2-4 s on a 2-core machine)."""
    from pulid.catalogue import required_weights

    env, reason = {
        "offline-flag": ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
        "refused": ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "hub cannot be reached"),
        "silent": ({"HF_ENDPOINT": request.getfixturevalue("silent_endpoint")}, "hub cannot be reached"),
    }[case]
    proc = start_without_weights(tmp_path, **env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    message = proc.stderr
    assert reason in message and "Traceback" not in message and "Retrying" not in message
    for entry in required_weights().values():
        assert str(tmp_path / "models" / entry.weights.local_name) in message
    assert "python -m pulid.serve.download" in message and message.count("HF_TOKEN") == 2


def test_flags_reach_the_loader(monkeypatch):
    import pulid.loading
    from flux.offload import MemoryPolicy
    from pulid.serve.startup import build_pipeline

    configs = []
    monkeypatch.setattr(pulid.loading, "load_pipeline", configs.append)
    build_pipeline(
        gradio_app.parse_args(
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
    seen = configs[-1]
    assert (seen.model, seen.version, seen.device) == ("flux-krea-dev", "v0.9.0", "cuda:1")
    assert seen.fp8 == "native" and seen.compiled is True
    assert seen.memory == MemoryPolicy(vram_budget_gb=12.0)
    assert seen.onnx_provider == "cpu" and seen.pretrained_model == "p.safetensors"
    build_pipeline(gradio_app.parse_args(["--aggressive_offload", "--device", "cuda"]))
    assert configs[-1].memory == MemoryPolicy(offload=True, aggressive=True) and configs[-1].fp8 is None


@pytest.mark.parametrize("value", ["nan", "inf", "-4", "0", "lots"])
def test_a_hostile_vram_budget_is_refused_by_the_parser(value, capsys):
    with pytest.raises(SystemExit):
        gradio_app.parse_args(["--vram_budget", value])
    assert "--vram_budget" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="what a machine without CUDA answers")
def test_a_flag_the_machine_cannot_honour_stops_the_start_with_one_message(tmp_path, monkeypatch):
    """What ``app_flux.py FLAGS`` says before it loads anything (the start itself, in this process)."""
    from pulid.serve.startup import load_or_exit

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for flags, message in [
        (["--device", "cuda"], "--device cuda: this machine has no NVIDIA GPU (nvidia-smi lists none)"),
        (["--device", "cpu", "--fp8", "--fp8_mode", "native"], "fp8 matrix units"),
        (["--device", "cpu", "--vram_budget", "12"], "--vram_budget 12 moves weights"),
        (["--device", "cpu", "--offload"], "--offload moves weights"),
    ]:
        args = gradio_app.parse_args(["--models_dir", str(tmp_path), "--port", str(free_port()), *flags])
        with pytest.raises(SystemExit) as stop:  # and no other exception: no traceback
            load_or_exit(args)
        assert message in str(stop.value.code), stop.value.code


def test_what_would_stop_the_app_after_loading_stops_it_before(tmp_path, monkeypatch):
    """A port in use, a host that is not this machine's, an outputs folder that cannot be written
    and --ray without Ray: each named at once, before minutes of loading, with what to do."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        args = gradio_app.parse_args(["--port", str(port), "--outputs_dir", str(blocker / "out")])
        problems = gradio_app.problems_before_loading(args)
    assert (
        problems[0]
        == f"port {port} on 127.0.0.1 is in use: stop what listens there, or pass --port with another."
    )
    assert problems[1].startswith(f"--outputs_dir {blocker / 'out'} cannot hold the images")
    assert (
        gradio_app.problems_before_loading(
            gradio_app.parse_args(
                ["--outputs_dir", str(tmp_path / "new" / "out"), "--port", str(free_port())]
            )
        )
        == []
    )
    assert (tmp_path / "new" / "out").is_dir()  # made, as saving would
    bad_host = gradio_app.parse_args(["--host", "999.1.1.1", "--outputs_dir", str(tmp_path)])
    assert gradio_app.problems_before_loading(bad_host) == [
        "--host '999.1.1.1' is not a name or address this machine can serve on."
    ]
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    ray = gradio_app.parse_args(
        [
            "--ray",
            "--outputs_dir",
            str(tmp_path),
            "--port",
            str(free_port()),
            "--ray_http_port",
            str(free_port()),
        ]
    )
    assert "--ray needs Ray Serve, an optional extra: pip install -r requirements-serve.txt" in (
        gradio_app.problems_before_loading(ray)
    )
    from pulid.serve import cli

    with pytest.raises(SystemExit):  # the command line checks its --out the same way, before loading
        cli.parse_args(["--prompt", "x", "--out", str(blocker / "out")])


@pytest.mark.slow  # README's snippet at its own settings; the calls above cover the endpoint
def test_the_readme_gradio_client_example_works_as_written(server, monkeypatch, capsys):
    """The README's API example, run against the test server (only the address changes)."""
    import re

    readme = (REPO / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "gradio_client" in b]
    assert len(blocks) == 1
    code = "\n".join(line[2:] if line.startswith("  ") else line for line in blocks[0].splitlines())
    assert "http://127.0.0.1:8080/" in code
    monkeypatch.chdir(REPO)
    exec(compile(code.replace("http://127.0.0.1:8080/", server), "README.md", "exec"), {})
    lines = [line for line in capsys.readouterr().out.splitlines() if "Loaded as API" not in line]
    assert len(lines) == 2 and lines[0].split()[1:2] == ["42"] and lines[1].split()[1:2] == ["43"]


def test_the_api_and_the_cli_put_two_people_in_one_image(client, tmp_path, capsys, run_cli):
    friend = tmp_path / "friend.png"
    with Image.open(PHOTO) as source:
        source.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(friend)
    pair = call(client, id_image=PHOTO, person_2=[friend], person_2_weight=0.7, seed="5")
    people = read_image_metadata(pair.image)["people"]
    assert people == [
        {"photos": 1, "weight": 1.0, "region": "column 1 of 2"},
        {"photos": 1, "weight": 0.7, "region": "column 2 of 2"},
    ]
    alone = call(client, id_image=PHOTO, seed="5")
    with Image.open(pair.image) as a, Image.open(alone.image) as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))
    left = tmp_path / "left.png"
    painted = np.zeros((64, 64), np.uint8)
    painted[:, :32] = 255
    Image.fromarray(painted).save(left)
    with pytest.raises(Exception, match="Person 3 has a region but no photo"):
        call(client, id_image=PHOTO, person_2=[friend], person_3_region=left, layout="masks", seed="5")
    # with 'columns' the page hides the regions, so one left there is not used
    hidden = call(
        client, id_image=PHOTO, person_2=[friend], person_2_weight=0.7, person_2_region=left, seed="5"
    )
    assert read_image_metadata(hidden.image)["people"] == people
    with pytest.raises(Exception, match="Person 2 has no region"):
        call(client, id_image=PHOTO, person_2=[friend], layout="masks", id_region=left, seed="5")

    flags = ["--prompt", "p", "--seed", "5", "--width", "256", "--height", "256", "--num_steps", "2"]
    out = tmp_path / "out"
    proc = run_cli(
        *flags,
        "--id_image",
        str(PHOTO),
        "--person",
        str(friend),
        "--person_weight",
        "0.7",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (image,) = out.glob("*.png")
    assert read_image_metadata(image)["people"] == people
    right = tmp_path / "right.png"
    Image.fromarray(255 - painted).save(right)
    pair = ["--id_image", str(PHOTO), "--person", str(friend)]
    masked = tmp_path / "masked"
    regions = ["--region", str(left), "--region", str(right)]
    proc = run_cli(*flags, *pair, "--layout", "masks", *regions, "--out", str(masked))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (image,) = masked.glob("*.png")
    assert [p["region"][:7] for p in read_image_metadata(image)["people"]] == ["sha256:", "sha256:"]
    too_many = ["--person", str(friend)] * 4  # refused with the flags, before any model loads
    refused = run_cli(*flags, "--id_image", str(PHOTO), *too_many, "--out", str(out))
    assert refused.returncode == 2 and "5 people were given; at most 4" in refused.stderr
    refused = run_cli(*flags, *pair, "--layout", "masks", "--out", str(out))
    assert refused.returncode == 2 and "Person 1 has no region" in refused.stderr


def test_a_mask_painted_in_the_page_is_the_same_mask_as_uploaded(client, tmp_path):
    strokes = np.zeros((512, 512, 4), np.uint8)  # the photo's size: transparent, one white square
    strokes[128:384, 128:384] = 255
    layer, mask = tmp_path / "strokes.png", tmp_path / "mask.png"
    Image.fromarray(strokes).save(layer)
    Image.fromarray(strokes[..., 3]).save(mask)
    edit = {"id_image": PHOTO, "seed": "5", "init_image": PHOTO, "strength": 0.5}
    painted = read_image_metadata(call(client, **edit, mask_drawing=layer).image)
    uploaded = read_image_metadata(call(client, **edit, mask=mask).image)
    assert painted["mask"] == uploaded["mask"] and painted["mask_area"] == uploaded["mask_area"]
    assert "mask_fit" not in painted  # the layer is at the photo's size
    with pytest.raises(Exception, match="Give one mask"):
        call(client, **edit, mask_drawing=layer, mask=mask)
    Image.fromarray(np.zeros((512, 512, 4), np.uint8)).save(layer)  # nothing painted: no mask
    assert "mask" not in read_image_metadata(call(client, **edit, mask_drawing=layer).image)


def test_regions_painted_in_the_page_are_the_regions_uploaded(client, tmp_path):
    from pulid.regions import PALETTE

    friend = tmp_path / "friend.png"
    with Image.open(PHOTO) as source:
        source.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(friend)
    strokes = np.zeros((256, 256, 4), np.uint8)  # red (person 1) on the left, green (person 2) right
    strokes[:, :120] = (*PALETTE[0], 255)
    strokes[:, 136:] = (*PALETTE[1], 255)
    painting, left, right = tmp_path / "painting.png", tmp_path / "left.png", tmp_path / "right.png"
    Image.fromarray(strokes).save(painting)
    Image.fromarray((strokes[..., 1] == PALETTE[0][1]).astype(np.uint8) * 255).save(left)
    Image.fromarray((strokes[..., 1] == PALETTE[1][1]).astype(np.uint8) * 255).save(right)
    pair = {"id_image": PHOTO, "person_2": [friend], "layout": "masks", "seed": "5"}
    painted = read_image_metadata(call(client, **pair, region_drawing=painting).image)["people"]
    uploaded = read_image_metadata(call(client, **pair, id_region=left, person_2_region=right).image)[
        "people"
    ]
    assert painted == uploaded and painted[0]["region"] != painted[1]["region"]
    with pytest.raises(Exception, match="Person 2 has a painted region and an uploaded one"):
        call(client, **pair, region_drawing=painting, person_2_region=right)


def test_the_tiny_preset_names_the_real_model_flags_it_ignores():
    from pulid.serve.startup import ignored_by_preset

    args = gradio_app.parse_args(
        ["--preset", "tiny-random", "--vram_budget", "8", "--fp8", "--device", "cuda"]
    )
    assert ignored_by_preset(args) == ["--fp8", "--device", "--vram_budget"]
    assert ignored_by_preset(gradio_app.parse_args(["--preset", "tiny-random", "--port", "9000"])) == []
    assert ignored_by_preset(gradio_app.parse_args(["--fp8"])) == []  # real models: every flag counts


@pytest.mark.slow  # the one real start of app_flux.py, and a signal to it
def test_sigterm_stops_the_app_cleanly_and_takes_its_temporary_faces_folder(tmp_path):
    """``docker stop`` and systemd send SIGTERM: the app closes as on Ctrl+C, no folder left behind."""
    import signal
    import socket
    import threading
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = subprocess.Popen(
        [sys.executable, "app_flux.py", "--preset", "tiny-random", "--dev", "--port", str(port)],
        cwd=REPO,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(app.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not any(line.startswith("Serving at") for line in lines) or not _answers(port):
            assert app.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.5)
        assert list(tmp_path.glob("pulid-flux-faces-*"))
        app.send_signal(signal.SIGTERM)
        app.wait(timeout=60)  # a guard against a hang: it takes about 2 s
        reader.join(timeout=10)
    finally:
        app.kill()
    output = "".join(lines)
    assert "Traceback" not in output and "share=True" not in output  # gradio's hint names no flag of ours
    assert "Loading weights" not in output and "Writing model shards" not in output  # transformers' bars
    assert f"Serving at http://127.0.0.1:{port}/ (--share makes a public link)" in output
    after = output.split("Ctrl+C stops it.")[-1]
    assert after.split() == ["Stopped."], after  # one line: not gradio's "Keyboard interruption..."
    assert list(tmp_path.glob("pulid-flux-faces-*")) == []


def test_a_port_taken_while_the_models_loaded_is_one_line(app_pipeline, tmp_path):
    """The start checks the port before loading; another program may take it meanwhile."""
    import socket

    args = gradio_app.parse_args(["--preset", "tiny-random"])
    demo = page.create_demo(args, gradio_app.make_service(app_pipeline, tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as stop:
            gradio_app.launch(demo, args, server_port=port, prevent_thread_lock=True)
    message = str(stop.value.code)
    assert f"Cannot start: port {port} on 127.0.0.1 was taken while the models loaded" in message
    assert "pass --port with another" in message and "server_port" not in message


def _answers(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/config", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize(
    "entry,meant",
    [
        ("generate.py", "--steps: did you mean --num_steps?"),
        ("app_flux.py", "--steps: no such flag"),  # the app's settings are on the page
        ("pulid/serve/download.py", "--steps: no such flag"),
    ],
)
def test_help_and_a_misspelt_flag_answer_before_torch_is_imported(entry, meant):
    """--help took 6-27 s (torch was imported first) and ``--steps 4`` got 28 lines of usage."""
    probe = (
        "import runpy, sys\n"
        f"for argv in (['--help'], ['--steps', '4']):\n"
        f"    sys.argv = [{entry!r}, *argv]\n"
        "    try:\n"
        f"        runpy.run_path({entry!r}, run_name='__main__')\n"
        "    except SystemExit as stop:\n"
        "        print('exit', stop.code)\n"
        "print('heavy:', sorted(m for m in ('torch', 'gradio', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert "heavy: []" in done.stdout and done.stdout.count("exit ") == 2, done.stdout + done.stderr
    assert "(default: " in done.stdout  # --help shows the defaults
    said = done.stderr.strip().splitlines()
    assert meant in done.stderr and len(said) <= 4, done.stderr
