"""The service between the UI and the pipeline: cancel, out-of-memory, bad values, PNG output."""

import numpy as np
import pytest
import torch

from pulid.outputs import read_png_metadata
from pulid.service import OOM_MESSAGE, GenerationService, ServiceError
from pulid.uploads import UploadError, load_upload
from tests.test_pipeline import StubFaceAnalysis, photo
from tiny_random.pipeline import tiny_pipeline


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    pipeline = tiny_pipeline(tmp_path_factory.mktemp("tiny"), StubFaceAnalysis())
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
    return service.build_request(photo(1), None, prompt="a photo of a woman", **values)


def test_result_is_a_png_with_the_settings(service):
    result = service.run(request(service))
    meta = read_png_metadata(result.path)
    assert result.seed == 3 and meta["seed"] == 3 and meta["num_steps"] == 4


def test_cancel_stops_the_run_and_the_next_run_works(service):
    seen = []

    def cancel_after_first_step(info):
        seen.append(info.step)
        service.cancel("alice")

    with pytest.raises(ServiceError, match="cancelled"):
        service.run(request(service), session="alice", progress=cancel_after_first_step)
    assert seen == [0]
    assert service.run(request(service), session="alice").seed == 3  # a new run is not cancelled


def test_out_of_memory_is_caught_and_the_next_request_succeeds(service, monkeypatch):
    released = []
    original = service.pipeline.flow.forward
    calls = {"n": 0}

    def flaky_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # fail in the middle of sampling
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(*args, **kwargs)

    monkeypatch.setattr(service.pipeline.flow, "forward", flaky_forward)
    monkeypatch.setattr(GenerationService, "release_memory", staticmethod(lambda: released.append(True)))
    with pytest.raises(ServiceError) as err:
        service.run(request(service))
    assert str(err.value) == OOM_MESSAGE and released == [True]
    assert service.run(request(service)).seed == 3


@pytest.mark.parametrize(
    "value,expected",
    [("-1", -1), ("", -1), (" 42 ", 42), ("1e3", 1000), (7, 7), (3.0, 3), (2**64 - 1, 2**64 - 1)],
)
def test_seed_parsing(service, value, expected):
    assert request(service, seed=value).seed == expected


@pytest.mark.parametrize(
    "value", ["abc", "1.5.2", "0x12", "1e400", "1.5", 1.5, float("inf"), None, True, 2**64]
)
def test_bad_seed_is_a_clear_error(service, value):
    with pytest.raises(ServiceError, match=r"Seed \(-1 for random\) must be a whole number from -1 to"):
        request(service, seed=value)


def test_invalid_settings_become_messages(service):
    with pytest.raises(ServiceError, match="Number of steps"):
        service.run(request(service, num_steps=0))
    with pytest.raises(ServiceError, match=r"Width must be a multiple of 16 .*\(got 'wide'\)"):
        request(service, width="wide")
    with pytest.raises(ServiceError, match="Width must .* Height must"):  # every problem at once
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
    with pytest.raises(UploadError, match="Could not read the image notes.png"):
        load_upload(fake)
    assert np.asarray(load_upload(rotated)).dtype == np.uint8
