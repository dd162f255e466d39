"""ZeroGPU: the GPU function of plain data, its duration, and the decorator outside a Space.

On a ZeroGPU Space ``spaces`` forks a worker and pickles the arguments and every yielded event
across; here a forked process with a pickling queue stands in for it, so the events and the
request must really cross a process boundary.
"""

import multiprocessing
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import spaces
import torch

from pulid.outputs import read_image_metadata
from pulid.request import SIZE_PRESETS, GenerationRequest
from pulid.serve import zerogpu
from pulid.serve.service import GenerationService, ServiceError
from tests.stubs import StubFaceAnalyzer, photo
from tiny_random.pipeline import tiny_pipeline

ROOT = Path(__file__).resolve().parent.parent


def request(**changes) -> GenerationRequest:
    values = dict(
        prompt="a photo of a woman",
        id_images=[photo(1)],
        width=256,
        height=256,
        num_steps=3,
        start_step=0,
        seed=5,
        max_sequence_length=128,
        num_images=2,
    )
    values.update(changes)
    return GenerationRequest(**values)


def pixels(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


def test_outside_a_space_the_decorator_returns_the_function_itself():
    assert not zerogpu.ON_ZERO_GPU
    assert zerogpu.spaces is spaces  # the package is installed with the app
    assert zerogpu.generate_on_gpu is zerogpu._generate

    def work(request):
        return request

    assert spaces.GPU(work, duration=zerogpu.gpu_seconds) is work


def test_the_gpu_function_is_handed_to_spaces_with_the_requests_duration():
    """What the module gives ``spaces.GPU``: a generator function of the request (spaces then
    streams its events) and a duration that takes the same arguments. (``spaces`` in ZeroGPU mode
    needs a CUDA build of torch, so its scheduling cannot run here.)"""
    code = (
        "import inspect, spaces\n"
        "seen = {}\n"
        "def recording_gpu(task, duration=None):\n"
        "    seen[task.__name__] = duration\n"
        "    return 'scheduled ' + task.__name__\n"
        "spaces.GPU = recording_gpu\n"
        "from pulid.serve import zerogpu\n"
        "assert zerogpu.generate_on_gpu == 'scheduled _generate'\n"
        "assert inspect.isgeneratorfunction(zerogpu._generate)\n"
        "assert seen['_generate'] is zerogpu.gpu_seconds\n"
        "params = lambda f: list(inspect.signature(f).parameters)\n"
        "assert params(zerogpu.gpu_seconds) == params(zerogpu._generate) == ['request']\n"
        "assert zerogpu.build_ahead_on_gpu == 'scheduled _build_ahead'\n"
        "assert seen['_build_ahead'] == zerogpu.AOT_SECONDS\n"
        "print('handed over')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "handed over" in done.stdout, done.stderr[-2000:]


def test_the_duration_grows_with_the_work_and_is_refused_past_the_limit(pipeline):
    base = request(num_images=1, num_steps=20, width=1024, height=1024)
    seconds = zerogpu.gpu_seconds(base)
    fixed = zerogpu.MARGIN * zerogpu.FIXED_SECONDS
    variable = seconds - fixed
    # twice the steps: the DiT passes double, the decode and the fixed part stay
    doubled = zerogpu.gpu_seconds(replace(base, num_steps=40)) - fixed
    assert 1.8 * variable < doubled < 2.0 * variable + 1
    assert zerogpu.gpu_seconds(replace(base, true_cfg=2.0)) > seconds + 0.9 * variable
    assert zerogpu.gpu_seconds(replace(base, num_images=2)) > seconds + 0.95 * variable
    larger = zerogpu.gpu_seconds(replace(base, width=2048, height=2048)) - fixed
    assert larger > 4.0 * variable  # four times the tokens, attention growing faster
    # a 1024x1024 28-step image: the eager H200 time (5.4 s at 896x1152) times 2.2, plus fixed
    assert 25 < zerogpu.gpu_seconds(replace(base, num_steps=28)) < 60
    # only the passes that run are booked: from a photo at strength 0.5, the last 10 steps; true
    # CFG's negative pass from its start step on
    photo = replace(base, init_image=np.zeros((1024, 1024, 3), np.uint8), strength=0.5)
    assert zerogpu.gpu_seconds(photo) - fixed < 0.6 * variable
    late_cfg = zerogpu.gpu_seconds(replace(base, true_cfg=2.0, cfg_start_step=10)) - fixed
    assert 1.4 * variable < late_cfg < 1.6 * variable
    assert set(zerogpu.AOT_SIZES) <= set(SIZE_PRESETS.values())  # compiled for sizes the page offers

    runner = zerogpu.ZeroGPURunner(pipeline, max_seconds=seconds)
    runner.admit(base)
    with pytest.raises(Exception, match=r"about \d+ s of GPU time .* at most \d+ s: use fewer steps"):
        runner.admit(replace(base, num_steps=21))


def test_the_flags_a_zero_gpu_space_refuses():
    from pulid.serve.gradio_app import parse_args
    from pulid.serve.startup import flag_conflicts

    assert flag_conflicts(parse_args([]), on_zero_gpu=True) == []
    flags = parse_args(["--offload", "--device", "cpu", "--replicas", "2"])
    problems = flag_conflicts(flags, on_zero_gpu=True)
    assert flag_conflicts(flags) == problems[:1]
    assert "--replicas puts one whole pipeline on each GPU" in problems[0]  # a rule off ZeroGPU too
    assert len(problems) == 4 and any("--offload" in p and "PULID_FLUX_ARGS" in p for p in problems)
    assert any("--device cpu" in p for p in problems[1:]) and any("--replicas:" in p for p in problems)
    assert any("--ray:" in p for p in flag_conflicts(parse_args(["--ray"]), on_zero_gpu=True))


def test_the_zero_gpu_runner_saves_the_same_images_as_the_local_one(pipeline, tmp_path):
    local = GenerationService(pipeline, tmp_path / "local")
    remote = GenerationService(pipeline, tmp_path / "zero", runner=zerogpu.ZeroGPURunner(pipeline))
    events = []
    a = local.run(request())
    b = remote.run(request(), progress=events.append)
    assert [i.seed for i in b.images] == [5, 6]
    for one, other in zip(a.images, b.images, strict=True):
        assert np.array_equal(pixels(one.path), pixels(other.path))
        assert read_image_metadata(other.path)["seed"] == one.seed
    steps = [e.step for e in events if hasattr(e, "step")]
    assert steps == [0, 1, 2] and "decoding" in events and "encoding the prompt" in events
    assert len(b.debug_images) == len(a.debug_images) > 0


def _forked_worker(request, results, read):
    """What a ZeroGPU worker does with the GPU function: iterate it, pickling every event. It
    lives on until the app process has read them, as a ZeroGPU worker does (torch passes tensors
    between processes as shared memory that the sender must keep)."""
    try:
        for event in zerogpu._generate(request):
            results.put(event)
    except BaseException as err:  # noqa: BLE001 - the stand-in passes it on, as spaces does
        results.put(repr(err))
    results.put(None)
    read.wait(120)


def forked_generate(request):
    """``generate_on_gpu`` as a forked process behind pickling queues (a stand-in for spaces)."""
    context = multiprocessing.get_context("fork")
    results, read = context.Queue(), context.Event()
    process = context.Process(target=_forked_worker, args=(request, results, read), daemon=True)
    process.start()
    try:
        while (event := results.get(timeout=120)) is not None:
            yield event
    finally:
        read.set()
        process.join(60)


def test_the_request_and_the_events_cross_a_process_boundary(pipeline, tmp_path, monkeypatch):
    local = GenerationService(pipeline, tmp_path / "local").run(request(num_images=1))
    monkeypatch.setattr(zerogpu, "generate_on_gpu", forked_generate)
    service = GenerationService(pipeline, tmp_path / "zero", runner=zerogpu.ZeroGPURunner(pipeline))
    events = []
    result = service.run(request(num_images=1), progress=events.append)
    assert np.array_equal(pixels(result.path), pixels(local.path))
    assert [e.step for e in events if hasattr(e, "step")] == [0, 1, 2]
    assert all(e.latents is None for e in events if hasattr(e, "step"))  # they stay in the worker


def test_an_expected_failure_in_the_worker_reaches_the_user_as_its_message(pipeline, tmp_path, monkeypatch):
    monkeypatch.setattr(zerogpu, "generate_on_gpu", forked_generate)
    service = GenerationService(pipeline, tmp_path, runner=zerogpu.ZeroGPURunner(pipeline))
    flat = np.full((256, 256, 3), 128, np.uint8)  # no face to repaint in it
    with pytest.raises(ServiceError, match="No face was found in the photo to start from"):
        service.run(request(num_images=1, init_image=flat, repaint="face"))


def test_a_bug_in_the_worker_is_raised_not_hidden(pipeline, tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(pipeline, "decode", broken)
    service = GenerationService(pipeline, tmp_path, runner=zerogpu.ZeroGPURunner(pipeline))
    with pytest.raises(ServiceError, match="failed on the server"):  # the visitor: a plain message
        service.run(request(num_images=1))
    assert "RuntimeError: decoder exploded" in caplog.text  # the log has the bug itself


def test_a_cancel_closes_the_gpu_call_and_stops_the_generation(pipeline, tmp_path):
    service = GenerationService(pipeline, tmp_path, runner=zerogpu.ZeroGPURunner(pipeline))
    seen = []

    def cancel_at_first_step(event):
        if hasattr(event, "step"):
            seen.append(event.step)
            service.cancel("bob")

    with pytest.raises(ServiceError, match="cancelled"):
        service.run(request(num_steps=8), session="bob", progress=cancel_at_first_step)
    assert seen == [0]
    assert not [t for t in threading.enumerate() if t.name == "generation-events"]
    assert service.run(request(num_images=1), session="bob").seed == 5


@pytest.mark.slow  # an ahead-of-time build; test_aot.py's fast test covers loading without one
def test_compile_on_zero_gpu_builds_in_a_gpu_slice_then_loads_in_the_app_process(tmp_path, monkeypatch):
    """``--compile`` on ZeroGPU: the GPU function builds the packages while generating at each size,
    then the app process compiles the blocks with the loading backend (which each worker
    inherits). The backends here only record what they are asked (the real one: tests/test_aot.py)."""
    made = []

    class Recording:
        def __init__(self, folder, mode):
            self.mode, self.graphs, self.built = mode, 0, []
            made.append(self)

        def __call__(self, graph, inputs):
            self.graphs += 1
            return graph.forward

        def prepare(self):
            self.prepared = True
            return 0.0

    calls = []

    def on_gpu(folder, photo, sizes):
        calls.append((folder, sizes))
        return zerogpu._build_ahead(folder, photo, sizes)

    monkeypatch.setattr(zerogpu, "AheadOfTime", Recording)
    monkeypatch.setattr(zerogpu, "build_ahead_on_gpu", on_gpu)
    pipeline = tiny_pipeline(tmp_path / "tiny", StubFaceAnalyzer())  # its own: its blocks get compiled
    before = pipeline.generate(request(num_images=1)).latents
    zerogpu.prepare_ahead_of_time(pipeline, photo(1), tmp_path / "aot", sizes=((256, 256), (320, 256)))
    assert calls == [(str(tmp_path / "aot"), ((256, 256), (320, 256)))]
    assert [b.mode for b in made] == ["build", "load"]
    assert made[0].graphs >= 3  # a double block, a single block and a cross-attention graph
    assert made[1].graphs == 0  # the loading backend waits for the first request
    assert getattr(made[1], "prepared", False)  # its one-time set-up done here, for every worker
    after = pipeline.generate(request(num_images=1)).latents
    assert made[1].graphs >= 3 and torch.allclose(after, before, rtol=1e-5, atol=1e-6)
    from pulid.serve.gradio_app import parse_args
    from pulid.serve.startup import flag_conflicts

    assert flag_conflicts(parse_args(["--compile"]), on_zero_gpu=True) == []  # ahead of time there


def test_a_cancelled_generation_that_outlives_its_stream_finishes_before_the_next_starts(monkeypatch):
    """A stage that does not report (a download, say) can keep a cancelled generation going after
    its stream gave up waiting: the next request on that pipeline waits for it to end."""
    import threading
    import time

    import pulid.serve.events
    from pulid.serve.events import generation_events

    monkeypatch.setattr(pulid.serve.events, "JOIN_SECONDS", 0.05)
    spans: list[tuple[str, float, float]] = []
    release = threading.Event()

    class SlowPipeline:
        def generate(self, request, callback=None, on_stage=None, on_image=None):
            started = time.monotonic()
            on_stage("loading LoRAs")
            if request == "first":
                release.wait(10)  # a long stage that never reports, so never sees the cancel
            spans.append((request, started, time.monotonic()))
            return type("Result", (), {"debug_images": []})()

    pipeline = SlowPipeline()
    first = generation_events(pipeline, "first")
    assert next(first) == "loading LoRAs"
    first.close()  # the visitor cancelled; the stream stops waiting after JOIN_SECONDS
    threading.Timer(0.3, release.set).start()
    assert list(generation_events(pipeline, "second"))[-1].debug_images == []
    (_, _, first_end), (_, second_start, _) = sorted(spans, key=lambda span: span[1])
    assert [name for name, *_ in sorted(spans, key=lambda span: span[1])] == ["first", "second"]
    assert second_start >= first_end  # one at a time on one pipeline
