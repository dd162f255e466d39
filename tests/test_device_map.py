"""Stages on several GPUs (``--devices``): the map, each GPU's plan, and refusals before loading."""

import pytest
import torch

import flux.offload.device_map as device_map_module
from flux.devices import HardwareError
from flux.offload import MemoryPolicy, measure
from flux.offload.device_map import DeviceMap, check_device_map
from flux.offload.plan import GiB
from pulid.loading import (
    ConflictingChoicesError,
    PipelineConfig,
    device_plans,
    load_pipeline,
    meta_pipeline,
    plan_counts,
)
from pulid.pipeline import STAGES

CUDA0, CUDA1 = torch.device("cuda:0"), torch.device("cuda:1")


@pytest.fixture(scope="module")
def full_size():
    """The full-size FLUX.1-dev pipeline on the meta device: only sizes are read."""
    return meta_pipeline("flux-dev")


def test_two_devices_put_the_dit_on_the_first_and_the_rest_on_the_second():
    mapped = DeviceMap.parse("cuda:0,cuda:1", STAGES)
    assert mapped.stages == {"text": CUDA1, "id": CUDA1, "denoise": CUDA0, "decode": CUDA1}
    assert mapped.devices == [CUDA1, CUDA0]  # in the order their first stage runs
    assert mapped.stages_on(CUDA1) == ["text", "id", "decode"]


def test_a_map_by_stage_and_the_stages_it_leaves_out():
    mapped = DeviceMap.parse("denoise=cuda:1, text=cpu", STAGES)
    assert mapped.stages == {"text": torch.device("cpu"), "id": CUDA1, "denoise": CUDA1, "decode": CUDA1}
    assert str(mapped) == "text=cpu, id=cuda:1, denoise=cuda:1, decode=cuda:1"
    assert DeviceMap.parse("cuda:1", STAGES) == DeviceMap.single("cuda:1", STAGES)


@pytest.mark.parametrize(
    "text,reason",
    [
        ("", "--devices is empty"),
        ("cuda:0,cuda:1,cuda:2", "say which stage goes where: text=...,id=...,denoise=...,decode=..."),
        ("denoise=cuda:0,cuda:1", "not both"),
        ("vae=cuda:1,denoise=cuda:0", "no stage 'vae'; the stages are text, id, denoise, decode"),
        ("text=cuda:1", "say where the denoise stage runs"),
        ("denoise=cuda:0,denoise=cuda:1", "the stage denoise is named twice"),
        ("gpu0,gpu1", "'gpu0' is not a device"),
    ],
)
def test_maps_that_mean_nothing_are_refused_with_the_reason(text, reason):
    with pytest.raises(HardwareError, match=reason.replace(".", r"\.").replace("'", ".")):
        DeviceMap.parse(text, STAGES)


def test_each_device_plans_its_own_stages_and_components(full_size):
    mapped = DeviceMap.parse("cuda:0,cuda:1", STAGES)
    plans = device_plans(mapped, MemoryPolicy(), full_size)
    assert list(plans[CUDA0].modes) == ["pulid_ca", "dit"]
    assert list(plans[CUDA1].modes) == ["t5", "clip", "id_encoder", "ae"]
    assert set(plans[CUDA0].stage_peaks) == {"denoise"}
    # together they hold what one GPU would, each with its own CUDA context (the overhead)
    one = MemoryPolicy().plan(measure(full_size.components()), STAGES, plan_counts())
    weights = {s.name: s.total for s in one.sizes}
    assert plans[CUDA0].peak == one.stage_peaks["denoise"] - sum(
        weights[n] for n in ("t5", "clip", "id_encoder", "ae")
    )
    # a budget is per GPU: each device's plan fits it on its own
    budget = MemoryPolicy(vram_budget_gb=12)
    for plan in device_plans(mapped, budget, full_size).values():
        assert plan.peak <= 12 * GiB


def test_a_device_this_machine_lacks_is_refused_with_the_plan(full_size):
    mapped = DeviceMap.parse("cuda:0,cuda:1", STAGES)
    with pytest.raises(HardwareError) as err:
        check_device_map(mapped, device_plans(mapped, MemoryPolicy(), full_size))
    message = str(err.value)
    assert message.startswith("--devices text=cuda:1, id=cuda:1, denoise=cuda:0, decode=cuda:1:")
    assert any(said in message for said in ("needs a CUDA build of PyTorch", "CUDA GPU(s)", "no NVIDIA GPU"))
    assert "pulid_ca, dit" in message and "t5, clip, id_encoder, ae" in message  # the table


def test_a_gpu_with_too_little_free_memory_is_refused_naming_it(full_size, monkeypatch):
    monkeypatch.setattr(device_map_module, "resolve_device", lambda device: device)  # two GPUs here
    mapped = DeviceMap.parse("cuda:0,cuda:1", STAGES)
    free = {CUDA0: 40 * GiB, CUDA1: 8 * GiB}
    resident = device_plans(mapped, MemoryPolicy(), full_size)
    with pytest.raises(HardwareError) as err:
        check_device_map(mapped, resident, free.get)
    message = str(err.value)
    need = resident[CUDA1].peak / GiB
    assert f"- cuda:1 needs {need:.2f} GiB for text, id, decode and has 8.00 GiB free" in message
    assert "cuda:0 needs" not in message  # the DiT's GPU has room
    assert "give a --vram_budget for each GPU" in message
    # the same map under a per-GPU budget that both GPUs have: accepted, the table returned
    table = check_device_map(
        mapped, device_plans(mapped, MemoryPolicy(vram_budget_gb=8), full_size), free.get
    )
    assert "cuda:1" in table and ("(offload)" in table or "(stream)" in table)


def test_the_loader_refuses_an_impossible_map_before_looking_for_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HardwareError, match="--devices .*denoise=cuda:0"):
        load_pipeline(
            PipelineConfig("flux-dev", devices="cuda:0,cuda:1", models_dir=tmp_path)
        )  # no weights there either
    with pytest.raises(ConflictingChoicesError, match="--device and --devices both given"):
        load_pipeline(
            PipelineConfig("flux-dev", device="cuda:0", devices="cuda:0,cuda:1", models_dir=tmp_path)
        )


def test_a_pipeline_denoises_on_its_maps_denoising_device(tmp_path):
    from tests.stubs import StubFaceAnalyzer
    from tiny_random.pipeline import tiny_pipeline

    pipeline = tiny_pipeline(tmp_path, StubFaceAnalyzer())
    assert pipeline.device_map == DeviceMap.single("cpu", STAGES)
    with pytest.raises(ValueError, match="denoises on cuda:0, not cpu"):
        pipeline.with_options(device_map=DeviceMap.parse("cuda:0,cpu", STAGES))
