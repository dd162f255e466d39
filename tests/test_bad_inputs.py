"""Every awkward input, through the Python API and the HTTP API: a clear answer, and the server goes on."""

import pytest

from pulid.images import ImageFile
from pulid.request import GenerationRequest, InvalidRequestError
from pulid.serve.service import GenerationService, ServiceError
from pulid.serve.uploads import load_upload
from tests.app_requests import call
from tests.bad_inputs import EXPECTED, write_bad_inputs


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return write_bad_inputs(tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="module")
def service(tmp_path_factory, app_pipeline):
    return GenerationService(app_pipeline, tmp_path_factory.mktemp("out"))


def outcome(run) -> str:
    try:
        run()
        return "ok"
    except (ServiceError, InvalidRequestError) as err:
        return str(err)
    except Exception as err:  # gradio_client's AppError carries the server's message
        return str(err)


def matches(result: str, expected: tuple[str, ...]) -> bool:
    return any(result == "ok" if e == "ok" else e in result for e in expected)


SETTINGS = dict(
    width=256,
    height=256,
    num_steps=1,
    start_step=0,
    guidance=4.0,
    seed="1",
    id_weight=1.0,
    neg_prompt="",
    true_cfg=1.0,
    cfg_start_step=1,
    max_sequence_length=128,
)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_python_api(service, bad_files, name):
    """A file in the request, as the Python API takes it: refused by the front door's check of its
    header (from_values) or at the job's turn, or read; either way the service goes on."""

    def run():
        request = GenerationRequest.from_values(
            id_images=[ImageFile(bad_files[name])], prompt="portrait", **SETTINGS
        )
        service.run(request)

    result = outcome(run)
    assert matches(result, EXPECTED[name]), result
    assert service.run(GenerationRequest.from_values(prompt="portrait", **SETTINGS)).seed == 1


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("field", ["id_image", "extra_images"])
def test_http_api(client, bad_files, name, field):
    path = bad_files[name]
    kw = {"id_image": path} if field == "id_image" else {"extra_images": [path]}
    result = outcome(lambda: call(client, **kw))
    assert matches(result, EXPECTED[name]), result  # the ID image and extra photos are read alike


def test_the_server_answers_after_every_bad_file(client):
    assert call(client, seed="5").seed == 5


def test_exif_rotation_is_applied(bad_files):
    import numpy as np

    from tests.bad_inputs import astronaut

    upright = load_upload(bad_files["exif_rotated.jpg"]).astype(float)
    original = np.asarray(astronaut()).astype(float)
    sideways = np.rot90(original)  # what the file stores
    assert upright.shape == original.shape
    assert np.abs(upright - original).mean() < 8  # JPEG noise only
    assert np.abs(upright - sideways).mean() > 30


def test_a_16_bit_grey_photo_reads_as_its_8_bit_copy(bad_files):
    """PIL's own conversion clips 16-bit grey to white; the file's 0-65535 is scaled to 0-255."""
    import numpy as np

    from pulid.images import painted_layer

    eight = load_upload(bad_files["grey.png"])
    sixteen = load_upload(bad_files["grey16.png"])
    assert sixteen.dtype == np.uint8 and np.array_equal(sixteen, eight)  # the file is 257 x each grey
    layer = painted_layer(bad_files["grey16.png"].read_bytes(), "mask")  # a mask or region, alike
    assert np.array_equal(layer[..., :3], eight)


def test_prompts_empty_long_and_too_long(service):
    for prompt in ["", ("a portrait, " * 200)[:2000]]:
        request = GenerationRequest.from_values(prompt=prompt, **SETTINGS)
        assert service.run(request).seed == 1
    for name in ("prompt", "neg_prompt"):  # 2 MB of text is refused before anything runs
        with pytest.raises(InvalidRequestError, match=r"too long \(2,000,000 characters; at most 2,000\)"):
            GenerationRequest.from_values(**{**SETTINGS, "prompt": "portrait", name: "x" * 2_000_000})
