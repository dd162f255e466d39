"""The full pipeline loader: what it checks before loading anything, and every missing file at once."""

import re

import pytest
import torch

from flux.devices import HardwareError, resolve_device
from flux.hub import WeightsNotFoundError, format_size
from flux.offload import BudgetError, MemoryPolicy, measure
from pulid.catalogue import CATALOGUE, FP8_MAP, required_weights
from pulid.loading import PipelineConfig, load_pipeline, meta_pipeline, plan_counts, resolve_fp8_mode
from pulid.pipeline import STAGES


def test_all_missing_files_are_listed_in_one_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as err:
        load_pipeline(PipelineConfig("flux-dev", "v0.9.0", "cpu", models_dir=tmp_path))
    message = str(err.value)
    needed = required_weights("flux-dev", "v0.9.0")
    assert f"{len(needed)} weight file(s) are missing" in message
    for entry in needed.values():
        weights = entry.weights
        assert weights.description in message and format_size(weights.size_bytes) in message
        assert str(tmp_path / weights.local_name) in message
    assert message.count("HF_TOKEN") == 2  # the two gated FLUX files
    assert "HF_HUB_OFFLINE is set" in message
    assert (
        f"python -m pulid.serve.download --name flux-dev --version v0.9.0 --models_dir {tmp_path}" in message
    )


def test_present_files_are_not_reported_and_a_missing_explicit_path_is(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "ae.safetensors").write_bytes(b"x")
    with pytest.raises(WeightsNotFoundError) as err:
        load_pipeline(
            PipelineConfig(
                "flux-krea-dev",
                "v0.9.1",
                "cpu",
                models_dir=tmp_path,
                pretrained_model=tmp_path / "mine.safetensors",
            )
        )
    assert "mine.safetensors is not a file" in str(err.value)
    with pytest.raises(WeightsNotFoundError) as err:
        load_pipeline(PipelineConfig("flux-krea-dev", "v0.9.1", "cpu", models_dir=tmp_path))
    message = str(err.value)
    assert "flux1-krea-dev.safetensors" in message and "krea-ae.safetensors" in message
    assert "FLUX.1-dev autoencoder" not in message  # ae.safetensors is flux-dev's, not krea's


def test_unreachable_hub_is_detected_once(tmp_path, monkeypatch):
    """One probe for the whole list of missing files, not one (with retries) per file."""
    import flux.hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    probes = []
    monkeypatch.setattr(flux.hub, "hub_reachable", lambda: probes.append(1) or False)
    with pytest.raises(WeightsNotFoundError, match="cannot be reached"):
        load_pipeline(PipelineConfig("flux-dev", "v0.9.1", "cpu", models_dir=tmp_path))
    assert probes == [1]


@pytest.mark.parametrize("answer", ["refused", "silent"])
def test_the_probe_gives_up_on_a_hub_that_refuses_or_never_answers(monkeypatch, answer):
    import socket
    import threading

    import flux.hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(flux.hub, "_reachable", {})
    from huggingface_hub import constants

    listener = socket.socket()  # accepts connections and never answers: a dropping firewall
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = 9 if answer == "refused" else listener.getsockname()[1]  # 9: the discard port, refused
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    found = []
    probe = threading.Thread(target=lambda: found.append(flux.hub.hub_reachable(timeout=1.0)), daemon=True)
    probe.start()
    probe.join(60)  # a guard against a hang only: the probe's own timeout is 1 s
    listener.close()
    assert found == [False]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert flux.hub.hub_reachable() is False


def test_the_catalogue_is_consistent():
    places = [entry.weights.local_name for entry in CATALOGUE]
    assert len(places) == len(set(places)), "two entries would share one place under models/"
    assert required_weights(fp8="quanto")["dit"].weights.filename == "flux-dev-fp8.safetensors"
    assert required_weights(fp8="quanto")["fp8_map"] is FP8_MAP and FP8_MAP.weights.optional
    assert "fp8_map" not in required_weights(fp8="native")
    with pytest.raises(ValueError, match="flux-dev, flux-krea-dev"):
        required_weights("flux-pro")
    with pytest.raises(ValueError, match="v0.9.0, v0.9.1"):
        required_weights("flux-dev", "v2")
    with pytest.raises(ValueError, match="no fp8 \\(quanto\\) checkpoint for flux-krea-dev"):
        required_weights("flux-krea-dev", fp8="quanto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA refuses")
def test_flags_this_machine_cannot_honour_stop_the_start(tmp_path):
    from flux.devices import nvidia_gpu_present

    if not nvidia_gpu_present():
        message = "this machine has no NVIDIA GPU"
    else:
        message = "CPU build" if torch.version.cuda is None else "no CUDA GPU"
    with pytest.raises(HardwareError, match=message):
        load_pipeline(PipelineConfig(device="cuda", models_dir=tmp_path))
    with pytest.raises(HardwareError, match="fp8 matrix units"):
        load_pipeline(PipelineConfig(device="cpu", fp8="native", models_dir=tmp_path))
    for policy in (
        MemoryPolicy(vram_budget_gb=12),
        MemoryPolicy(offload=True),
        MemoryPolicy(aggressive=True),
    ):
        with pytest.raises(HardwareError, match=re.escape(policy.describe()) + ".* CUDA GPU"):
            load_pipeline(PipelineConfig(device="cpu", memory=policy, models_dir=tmp_path))
    assert resolve_fp8_mode("auto", torch.device("cpu")) == "quanto"  # no fp8 units: XLabs' file
    with pytest.raises(HardwareError, match="not a device"):
        resolve_device("gpu0")
    assert resolve_device(None) == torch.device("cpu")


def test_flags_that_cannot_go_together_are_all_named_before_anything_loads(cli_in_process, monkeypatch):
    """One function holds the rules between flags; the CLI (and the app, test_replicas.py) stops on
    every conflict at once, before a model loads or a weight is looked for."""
    from pulid.serve import cli
    from pulid.serve.startup import flag_conflicts

    loaded = []
    monkeypatch.setattr(cli, "load_or_exit", lambda args: loaded.append(args))
    flags = ["--fp8", "--dit", "flux-dev-Q8_0", "--device", "cuda:0", "--devices", "cuda:0,cuda:1"]
    flags += ["--sequence_parallel", "--prompt", "a portrait"]
    done = cli_in_process(flags)
    said = done.stderr.split("Cannot start:")[-1]
    assert done.returncode == 1 and not loaded
    for rule in ("pass one of them", "--device and --devices both given", "each rank holds the whole"):
        assert rule in said
    assert "--sequence_parallel gives each rank its own GPU (cuda:LOCAL_RANK): drop --device" in said
    assert len(flag_conflicts(cli.parse_args(flags))) == said.count("\n- ") == 4
    assert flag_conflicts(cli.parse_args(["--fp8", "--prompt", "a portrait"])) == []


def test_a_budget_that_cannot_be_met_is_known_before_loading():
    sizes = measure(meta_pipeline("flux-dev").components())
    with pytest.raises(BudgetError, match="smallest plan needs"):
        MemoryPolicy(vram_budget_gb=2).plan(sizes, STAGES, plan_counts())
    assert MemoryPolicy(vram_budget_gb=24).plan(sizes, STAGES, plan_counts()).peak <= 24 * 1024**3
    with pytest.raises(ValueError, match="positive number of GiB"):
        MemoryPolicy(vram_budget_gb=float("nan"))


def test_the_face_detector_runs_where_the_id_stage_does_unless_told():
    import torch

    from pulid.loading import face_provider

    assert face_provider("auto", torch.device("cpu")) == "cpu"
    assert face_provider("auto", torch.device("cuda", 1)) == "gpu"
    assert face_provider("gpu", torch.device("cpu")) == "gpu"  # asked for: the warning then helps
    assert face_provider("cpu", torch.device("cuda", 0)) == "cpu"
