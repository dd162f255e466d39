"""The service between the UI and the pipeline: cancel, out-of-memory, bad values, PNG output."""

import numpy as np
import pytest
import torch

from pulid.images import ImageError
from pulid.outputs import read_image_metadata
from pulid.request import GenerationRequest, InvalidRequestError
from pulid.serve.service import FAILED_MESSAGE, OOM_MESSAGE, GenerationService, ServiceError
from pulid.serve.uploads import load_upload
from tests.stubs import StubFaceAnalyzer, photo
from tiny_random.pipeline import tiny_pipeline


@pytest.fixture(scope="module")
def service(pipeline, tmp_path_factory):
    return GenerationService(pipeline, tmp_path_factory.mktemp("out"))


def request(service, **kw):
    values = dict(
        width=256,
        height=256,
        num_steps=4,
        start_step=0,
        guidance=4.0,
        seed="3",
        id_weight=1.0,
        neg_prompt="",
        true_cfg=1.0,
        cfg_start_step=1,
        max_sequence_length=128,
    )
    values.update(kw)
    return GenerationRequest.from_values(id_images=[photo(1)], prompt="a photo of a woman", **values)


def test_result_is_a_png_with_the_settings(service):
    result = service.run(request(service))
    meta = read_image_metadata(result.path)
    assert result.seed == 3 and meta["seed"] == 3 and meta["num_steps"] == 4


def test_cancel_stops_the_run_and_the_next_run_works(service):
    seen = []

    def cancel_after_first_step(info):
        if isinstance(info, str):  # a stage starting ("encoding the prompt", ...)
            return
        seen.append(info.step)
        service.cancel("alice")

    with pytest.raises(ServiceError, match="cancelled"):
        service.run(request(service), session="alice", progress=cancel_after_first_step)
    assert seen == [0]
    assert service.run(request(service), session="alice").seed == 3  # a new run is not cancelled


def test_out_of_memory_is_caught_and_the_next_request_succeeds(service, monkeypatch):
    released = []
    original = service.pipeline.dit.forward
    calls = {"n": 0}

    def flaky_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # fail in the middle of sampling
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(*args, **kwargs)

    monkeypatch.setattr(service.pipeline.dit, "forward", flaky_forward)
    monkeypatch.setattr(GenerationService, "release_memory", staticmethod(lambda: released.append(True)))
    with pytest.raises(ServiceError) as err:
        service.run(request(service))
    assert str(err.value) == OOM_MESSAGE and released == [True]
    assert service.run(request(service)).seed == 3


def test_an_unexpected_error_is_logged_and_the_visitor_told_plainly(service, monkeypatch, caplog):
    def broken_forward(*args, **kwargs):
        raise RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR at /srv/secret/path")

    monkeypatch.setattr(service.pipeline.dit, "forward", broken_forward)
    with pytest.raises(ServiceError) as err:
        service.run(request(service))
    assert str(err.value) == FAILED_MESSAGE  # nothing of the server's internals in the answer
    assert "CUDNN_STATUS_INTERNAL_ERROR" in caplog.text  # the traceback is in the log
    monkeypatch.undo()
    assert service.run(request(service)).seed == 3


def test_an_image_that_cannot_be_saved_is_a_message_not_a_traceback(tmp_path, monkeypatch):
    pipeline = tiny_pipeline(tmp_path / "tiny", StubFaceAnalyzer())
    service = GenerationService(pipeline, tmp_path / "out")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pulid.serve.service.save_new_image", full_disk)
    with pytest.raises(ServiceError, match=r"could not be saved on the server \(No space left on device\)"):
        service.run(request(service))


@pytest.mark.parametrize(
    "value,expected",
    [("-1", -1), ("", -1), (" 42 ", 42), ("42.0", 42), (7, 7), (3.0, 3), (2**64 - 1, 2**64 - 1)],
)
def test_seed_parsing(service, value, expected):
    assert request(service, seed=value).seed == expected


@pytest.mark.parametrize(
    "value", ["abc", "1.5.2", "0x12", "1e400", "1.5", 1.5, float("inf"), None, True, 2**64, "1e3", "1_000"]
)
def test_bad_seed_is_a_clear_error(service, value):
    with pytest.raises(
        InvalidRequestError, match=r"Seed \(-1 for random\) must be a whole number from -1 to"
    ):
        request(service, seed=value)


def test_invalid_settings_become_messages(service):
    """A request built in Python without from_values is checked by the service all the same."""
    with pytest.raises(ServiceError, match="Number of steps"):
        service.run(GenerationRequest(prompt="a portrait", num_steps=0))
    with pytest.raises(ServiceError, match="The ID photos must be a list of images"):
        service.run(GenerationRequest(prompt="a portrait", id_images=["face.png"]))  # a path: ImageFile
    with pytest.raises(InvalidRequestError, match=r"Width must be a multiple of 16 .*\(got 'wide'\)"):
        request(service, width="wide")
    with pytest.raises(InvalidRequestError, match="Width must .* Height must"):  # every problem at once
        request(service, width="1e400", height=float("inf"))


def test_uploads_are_read_rotated_and_bad_files_refused(tmp_path):
    from PIL import Image

    rotated = tmp_path / "rotated.jpg"
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(rotated, exif=exif)
    assert load_upload(rotated).shape == (40, 20, 3)
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    with pytest.raises(ImageError, match="Could not read the image notes.png"):
        load_upload(fake)
    assert np.asarray(load_upload(rotated)).dtype == np.uint8


def test_a_job_cancelled_while_decoding_stops_between_decoder_blocks(service):
    from flux.autoencoder import ResnetBlock

    blocks = [m for m in service.pipeline.ae.decoder.modules() if isinstance(m, ResnetBlock)]
    ran = []
    handles = [b.register_forward_pre_hook(lambda *_: ran.append(1)) for b in blocks]
    stages = []

    def cancel_when_decoding(info):
        stages.append(info if isinstance(info, str) else "step")
        if info == "decoding" and len(ran) == 2:
            job.cancel()  # two decoder blocks in

    try:
        job = service.start(request(service), session="decoder", progress=cancel_when_decoding)
        assert job.wait(120)
        with pytest.raises(ServiceError, match="cancelled"):
            job.result()
    finally:
        for handle in handles:
            handle.remove()
    assert 2 <= len(ran) < len(blocks)
    assert stages[:2] == ["starting", "encoding the prompt"] and "reading the face" in stages
    assert not any(b._forward_pre_hooks for b in blocks)  # the pipeline's decode hooks are gone


def test_cancel_reaches_only_the_jobs_of_that_session(service):
    import threading

    gate = threading.Event()

    def hold(info):
        gate.wait(30)  # both jobs are under way before either may go on

    mine = service.start(request(service, seed=1), session="mine", progress=hold)
    other = service.start(request(service, seed=2), session="other", progress=hold)
    service.cancel("mine")
    gate.set()
    assert mine.wait(120) and other.wait(120)
    with pytest.raises(ServiceError, match="cancelled"):
        mine.result()
    assert other.result().seed == 2


def test_the_same_request_twice_gives_two_files(service, tmp_path):
    from PIL import Image

    from pulid.outputs import save_new_image

    first, second = service.run(request(service)), service.run(request(service))
    assert first.path != second.path and first.path.is_file() and second.path.is_file()
    assert first.path.name < second.path.name  # sortable: date, time, then the service's counter
    image = Image.new("RGB", (4, 4))
    names = {save_new_image(image, {"seed": 1, "prompt": "a"}, tmp_path, 7).name for _ in range(3)}
    assert len(names) == 3  # the same name asked for three times: never a replaced file


def test_the_line_is_first_come_first_served_bounded_per_visitor_and_left_on_cancel(tmp_path):
    """Jobs run in the order they came; a visitor's fourth place and the line's overflow are
    refused at once; a job cancelled while it waits leaves the line without running."""
    import threading

    from pulid.serve.service import ServiceBusy

    pipeline = tiny_pipeline(tmp_path / "tiny", StubFaceAnalyzer())
    service = GenerationService(pipeline, tmp_path / "out", max_waiting=4, max_per_client=3)
    gate, order, heard = threading.Event(), [], {}

    def track(name):
        def progress(info):
            heard.setdefault(name, []).append(info)
            if info == "starting":
                order.append(name)
                if name == "a1":
                    gate.wait(60)  # the first job holds the pipeline while the line forms

        return progress

    jobs = {}
    for name, client in [("a1", "A"), ("a2", "A"), ("b1", "B"), ("a3", "A")]:
        jobs[name] = service.start(
            request(service, seed=len(jobs)), session=name, progress=track(name), client=client
        )
    with pytest.raises(ServiceBusy, match="already have 3 requests"):
        service.start(request(service), session="a4", client="A")
    jobs["c1"] = service.start(request(service), session="c1", progress=track("c1"), client="C")
    with pytest.raises(ServiceBusy, match="busy \\(4 requests are waiting\\)"):
        service.start(request(service), session="d1", client="D")
    assert service.waiting() == 5
    service.cancel("b1")  # waiting behind a1 and a2
    assert jobs["b1"].wait(10), "a job cancelled in the line must leave it at once"
    with pytest.raises(ServiceError, match="cancelled"):
        jobs["b1"].result()
    gate.set()
    for name, job in jobs.items():
        assert job.wait(120), name
    assert order == ["a1", "a2", "a3", "c1"]
    assert "waiting for the GPU: 2 ahead" in heard["a3"] and "waiting for the GPU: 1 ahead" in heard["a3"]
    assert service.waiting() == 0
    assert service.start(request(service), session="a5", client="A").wait(120)  # A's places came back
