"""One image on several ranks (Ulysses sequence parallelism), on the CPU with two gloo processes.

Both ranks hold the same tiny pipeline and run the same requests with the DiT's tokens split
between them; the results must be those of one process: the DiT's prediction against a float64
computation of the unsplit model, and whole generations (two people in their regions, true CFG,
the step cache's decisions) against one process in float32.
"""

import copy
import dataclasses
import datetime
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flux.model import Flux
from flux.parallel import SequenceParallelFlux, SequenceShards, ShardingError
from pulid import stages
from pulid.injection import Identity, PuLIDInjection
from pulid.request import GenerationRequest, InvalidRequestError, Person
from pulid.serve.ranks import SequenceParallelRunner, follow
from pulid.serve.service import Cancelled, GenerationService, ServiceError
from tests.stubs import StubFaceAnalyzer, photo
from tests.tiny_models import dit_inputs
from tiny_random.models import tiny_flux_params
from tiny_random.pipeline import tiny_pipeline

WORLD = 2
F32_TOLERANCE = 2e-5  # float32 against float64, relative (max abs error over max abs value)


def requests() -> dict[str, GenerationRequest]:
    base = dict(prompt="two friends", id_images=[photo(1)], width=256, height=256, num_steps=4, seed=11)
    base["max_sequence_length"] = 128
    friend = Person((photo(2),), 0.9)
    return {
        "two people in columns, true CFG": GenerationRequest(
            **base, more_people=(friend,), layout="columns", true_cfg=2.0, neg_prompt="blurry"
        ),
        "one person, step cache": GenerationRequest(
            **{**base, "num_steps": 8}, cache_threshold=0.5, cache_full_first=1, cache_full_last=1
        ),
    }


def four_head_dit():
    """A tiny DiT with 4 heads, 2 per rank: the all-to-alls must keep the heads in order."""
    torch.manual_seed(7)
    return Flux(tiny_flux_params(num_heads=4, axes_dim=[4, 6, 6])).eval()


def two_identities(cas, length, seed=5):
    g = torch.Generator().manual_seed(seed)
    left = torch.zeros(1, length, 1)
    left[:, : length // 3] = 1.0
    left[:, length // 3 : length // 2] = 0.5  # a soft edge that crosses the ranks' boundary
    right = 1.0 - left
    width = cas[0].norm1.normalized_shape[0]  # the ID tokens' width (kv_dim)
    tokens = [torch.randn(1, 32, width, generator=g) for _ in range(2)]
    return [Identity.within(tokens[0], 1.0, left), Identity.within(tokens[1], 0.8, right)]


def _rank(rank: int, port: int, folder: str, out: str) -> None:
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=WORLD,
            timeout=datetime.timedelta(seconds=60),  # a rank left waiting fails the test, not hangs it
        )
        torch.manual_seed(0)
        pipeline = tiny_pipeline(Path(folder), StubFaceAnalyzer())
        results = {}
        # the DiT alone, with two identities in regions that the ranks split
        dit = SequenceParallelFlux(four_head_dit())
        inputs = dit_inputs(dit.dit)
        identities = two_identities(pipeline.pulid_ca, inputs["img"].shape[1])
        mine = dit.image_tokens(inputs["img"].shape[1])
        params = dit.params
        injection = PuLIDInjection(
            pipeline.pulid_ca, [i.part(mine) for i in identities], params.depth, params.depth_single_blocks
        )
        with torch.inference_mode():
            results["dit"] = dit(**inputs, id_injection=injection)
        parallel = SequenceParallelFlux(pipeline.dit)
        # whole generations
        split = pipeline.with_options(parallel=parallel)
        for name, request in requests().items():
            result = split.generate(request)
            results[name] = (result.latents, result.metadata.get("cache_full_steps"))
        try:  # 17 x 17 image tokens cannot be split in two
            split.generate(dataclasses.replace(requests()["one person, step cache"], width=272, height=272))
        except InvalidRequestError as err:
            results["refusal"] = str(err)
        # the app: rank 0's service shares each request; a cancel there stops both ranks
        if rank == 0:
            runner = SequenceParallelRunner(split)
            service = GenerationService(split, Path(out) / "app", runner=runner)
            request = requests()["one person, step cache"]

            def cancel_at(point):
                def progress(event):
                    if event == point or getattr(event, "step", None) == point:
                        service.cancel("visitor")

                return progress

            # at a step, at a stage before denoising, and while the first of two images decodes
            two = dataclasses.replace(request, num_images=2)
            for name, sent, point in (("step", request, 1), ("stage", request, stages.ENCODING_PROMPT)):
                try:
                    service.run(sent, session="visitor", progress=cancel_at(point))
                except ServiceError as err:
                    results[f"app cancelled at a {name}"] = str(err)
            try:
                service.run(two, session="visitor", progress=cancel_at(stages.DECODING))
            except Cancelled as err:
                results["app cancelled while decoding"] = [image.seed for image in err.images]
            results["app after"] = service.run(request).seed
            runner.close()
        else:
            follow(split)
            results["app after"] = "followed to the end"
        torch.save(results, Path(out) / f"rank{rank}.pt")
    except BaseException:
        (Path(out) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results (one launch for every check here)."""
    folder, out = tmp_path_factory.mktemp("tiny"), tmp_path_factory.mktemp("ranks")
    tiny_pipeline(folder, StubFaceAnalyzer())  # writes the text encoders' files once, before the ranks
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        mp.start_processes(_rank, args=(port, str(folder), str(out)), nprocs=WORLD, start_method="spawn")
    except Exception:
        errors = [p.read_text() for p in sorted(out.glob("*.error"))]
        pytest.fail("a rank failed:\n" + "\n".join(errors))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)], folder


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_the_split_dit_predicts_what_the_whole_one_does_in_float64(ranks):
    results, folder = ranks
    pipeline = tiny_pipeline(folder, StubFaceAnalyzer())
    reference = four_head_dit().double()
    cas = copy.deepcopy(pipeline.pulid_ca).double()
    inputs = {k: v.double() for k, v in dit_inputs(reference).items()}
    identities = [
        dataclasses.replace(i, tokens=i.tokens.double(), region=i.region.double())
        for i in two_identities(pipeline.pulid_ca, inputs["img"].shape[1])
    ]
    params = reference.params
    injection = PuLIDInjection(cas, identities, params.depth, params.depth_single_blocks)
    with torch.inference_mode():
        expected = reference(**inputs, id_injection=injection)
    for rank in results:
        assert rank["dit"].shape == expected.shape
        assert relative_error(rank["dit"], expected) < F32_TOLERANCE
    assert torch.equal(results[0]["dit"], results[1]["dit"])  # every rank has the whole prediction


@pytest.mark.parametrize("name", list(requests()))
def test_a_split_generation_gives_the_latents_of_one_process(ranks, name):
    results, folder = ranks
    pipeline = tiny_pipeline(folder, StubFaceAnalyzer())
    alone = pipeline.generate(requests()[name])
    for rank in results:
        latents, cache_steps = rank[name]
        assert relative_error(latents, alone.latents) < 1e-4  # float32 both ways, 4-8 steps apart
        assert cache_steps == alone.metadata.get("cache_full_steps")  # the same skips on every rank
    if "cache" in name:
        assert alone.metadata["cache_full_steps"] != "8 of 8"  # the cache did skip some steps


def test_sizes_the_ranks_cannot_share_are_refused_with_what_to_change(ranks):
    results, _ = ranks
    for rank in results:
        assert (
            "289 image tokens ((width / 16) x (height / 16)) cannot be split evenly over 2 GPUs"
            in (rank["refusal"])
        )


def test_shards_are_contiguous_equal_parts():
    parts = [SequenceShards(r, 3).part(12) for r in range(3)]
    assert parts == [slice(0, 4), slice(4, 8), slice(8, 12)]
    with pytest.raises(ShardingError, match="10 tokens cannot be split evenly over 3 GPUs"):
        SequenceShards(0, 3).part(10)


@pytest.mark.slow  # torchrun starts two processes that each build the pipeline
def test_the_command_line_under_torchrun_writes_the_image_of_one_process(tmp_path):
    """``torchrun --nproc-per-node 2 generate.py --sequence_parallel`` on the tiny preset (gloo on
    the CPU): rank 0 writes the one image, and it is the image one process makes."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from pulid.serve import cli
    from pulid.serve.startup import build_pipeline

    root = Path(__file__).resolve().parent.parent
    flags = ["--preset", "tiny-random", "--id_image", str(root / "example_inputs" / "astronaut.png")]
    flags += [
        "--prompt",
        "a portrait",
        "--seed",
        "3",
        "--num_steps",
        "3",
        "--width",
        "256",
        "--height",
        "256",
    ]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", f"--master-port={port}"]
    done = subprocess.run(
        [*launch, "generate.py", *flags, "--sequence_parallel", "--out", str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    written = list(tmp_path.glob("*.png"))
    assert len(written) == 1 and done.stdout.count("seed=3") == 1  # rank 0 alone writes and prints

    args = cli.parse_args([*flags, "--out", str(tmp_path / "alone")])
    request = args.requests[0]
    request.id_images = [np.asarray(Image.open(root / "example_inputs" / "astronaut.png").convert("RGB"))]
    alone = np.asarray(build_pipeline(args).generate(request).image, dtype=int)
    split = np.asarray(Image.open(written[0]), dtype=int)
    difference = np.abs(split - alone)
    # float32 sums in another order: a value may cross a uint8 step, by one, in a few pixels
    assert difference.max() <= 1 and (difference > 0).mean() < 0.005


def test_sequence_parallel_without_torchrun_says_how_to_start_it(monkeypatch):
    from flux.devices import HardwareError
    from pulid.serve.ranks import join_torchrun

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(HardwareError, match="start it with torchrun, e.g. `torchrun --nproc-per-node 2"):
        join_torchrun()


def test_the_app_shares_each_request_and_a_cancel_stops_every_rank(ranks):
    results, _ = ranks
    # a cancel at any point stops both ranks there, and the next request runs on both
    cancelled = results[0]["app cancelled at a step"], results[0]["app cancelled at a stage"]
    assert cancelled == ("Generation cancelled.",) * 2
    assert results[0]["app cancelled while decoding"] == []  # stopped before the first image was saved
    assert results[0]["app after"] == 11  # the next request ran on both ranks
    assert results[1]["app after"] == "followed to the end"  # rank 1 left its loop when told


@pytest.mark.slow  # torchrun starts two processes that each build the pipeline
def test_the_app_under_torchrun_serves_the_image_of_one_process(tmp_path):
    """``torchrun --nproc-per-node 2 app_flux.py --sequence_parallel``: rank 0 serves the page and
    shares each request; the image that comes back is the one one process makes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import numpy as np
    from gradio_client import Client, handle_file
    from PIL import Image

    from pulid.serve.startup import build_pipeline

    root = Path(__file__).resolve().parent.parent
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        f"--master-port={ports[0]}",
    ]
    app = [*launch, "app_flux.py", "--preset", "tiny-random", "--sequence_parallel", "--port", str(ports[1])]
    log = open(tmp_path / "app.log", "w")  # noqa: SIM115 - closed with the process below
    server = subprocess.Popen(app, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{ports[1]}/"
        for _ in range(120):
            try:
                client = Client(url, verbose=False)
                break
            except Exception:  # noqa: BLE001 - not up yet
                assert server.poll() is None, (tmp_path / "app.log").read_text()[-3000:]
                time.sleep(1)
        photo = root / "example_inputs" / "astronaut.png"
        gallery, *_ = client.predict(
            id_image=handle_file(str(photo)),
            prompt="a portrait",
            width=256,
            height=256,
            num_steps=3,
            seed="3",
            api_name="/generate",
        )
        served = np.asarray(Image.open(gallery[0]["image"]).convert("RGB"), dtype=int)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        log.close()
    from pulid.serve import gradio_app

    args = gradio_app.parse_args(["--preset", "tiny-random"])
    request = GenerationRequest(
        prompt="a portrait",
        id_images=[np.asarray(Image.open(photo).convert("RGB"))],
        width=256,
        height=256,
        num_steps=3,
        seed=3,
    )
    alone = np.asarray(build_pipeline(args).generate(request).image, dtype=int)
    difference = np.abs(served - alone)
    assert difference.max() <= 1 and (difference > 0).mean() < 0.005
