"""``--replicas N``: one pipeline per GPU, N jobs at once behind the service's line."""

import threading
from pathlib import Path

import numpy as np
import pytest

from flux.devices import HardwareError
from pulid.request import GenerationRequest
from pulid.serve.service import GenerationService, LocalRunner, ReplicaRunner
from tests.stubs import StubFaceAnalyzer, photo
from tiny_random.pipeline import tiny_pipeline


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    return [tiny_pipeline(folder, StubFaceAnalyzer()) for _ in range(2)]


def request(seed: int) -> GenerationRequest:
    return GenerationRequest(
        prompt="a portrait", id_images=[photo(1)], width=256, height=256, num_steps=3, seed=seed
    )


def test_two_replicas_run_two_jobs_at_once_with_the_right_images(replicas, tmp_path):
    service = GenerationService(replicas[0], tmp_path, runner=ReplicaRunner(replicas))
    both_running = threading.Barrier(2, timeout=30)  # breaks unless two jobs are in steps together
    met = []

    def meet(event) -> None:
        if getattr(event, "step", None) == 0:
            met.append(both_running.wait())

    jobs = [service.start(request(seed), session=f"s{seed}", progress=meet) for seed in (1, 2)]
    for job in jobs:
        assert job.wait(60)
    results = [job.result() for job in jobs]
    assert sorted(met) == [0, 1]  # both reached the barrier, neither timed out
    for seed, result in zip((1, 2), results, strict=True):
        alone = replicas[0].generate(request(seed)).image
        assert result.seed == seed
        assert np.array_equal(np.asarray(alone), np.asarray(_png(result.path)))


def test_a_third_job_waits_for_a_free_replica_and_is_told_its_place(replicas, tmp_path):
    service = GenerationService(replicas[0], tmp_path, runner=ReplicaRunner(replicas))
    release = threading.Event()
    started = threading.Semaphore(0)

    def hold(event) -> None:
        if getattr(event, "step", None) == 0:
            started.release()
            assert release.wait(60)

    first = [service.start(request(seed), session=f"h{seed}", progress=hold) for seed in (1, 2)]
    for _ in first:
        assert started.acquire(timeout=30)
    told = []
    third = service.start(request(3), session="late", progress=told.append)
    while not any(isinstance(t, str) and t.startswith("waiting") for t in told):
        assert not third.wait(0.05)
    assert "waiting for the GPU: 1 ahead" in told
    release.set()
    assert all(job.wait(60) for job in [*first, third]) and third.result().seed == 3


def test_one_replica_is_the_plain_service(replicas):
    service = GenerationService(replicas[0])
    assert isinstance(service.runner, LocalRunner) and service._line.running == 1


def test_replicas_that_cannot_be_placed_are_refused():
    from pulid.serve.gradio_app import parse_args
    from pulid.serve.startup import build_replicas
    from pulid.serve.topology import serving_for

    with pytest.raises(HardwareError, match="--replicas 2 needs 2 GPUs and this machine has 0"):
        build_replicas(parse_args(["--replicas", "2"]), 2)
    with pytest.raises(SystemExit, match="--replicas puts one whole pipeline on each GPU: drop --device, "):
        flags = parse_args(["--replicas", "2", "--device", "cuda:1"])
        serving_for(flags, [], Path("unused.png"), in_space=False)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--replicas", "0"], "--replicas: from 1 to 64 (got 0)"),
        (["--replicas", "-2", "--ray"], "--replicas: from 1 to 64 (got -2)"),
        (["--replicas", "two"], "--replicas: a whole number is needed (got 'two')"),
        (["--ray_http_port", "70000"], "--ray_http_port: from 1 to 65535 (got 70000)"),
    ],
)
def test_a_replica_count_or_port_out_of_range_stops_at_the_parser(argv, message, capsys):
    from pulid.serve.gradio_app import parse_args

    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def _png(path):
    from PIL import Image

    return Image.open(path).convert("RGB")
