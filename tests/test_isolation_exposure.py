"""Concurrent users never mix, the server exposes nothing it should not, and a short soak stays clean."""

import pickle
import threading

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tests.app_requests import PHOTO, call


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """Two different people for the stand-in models: the astronaut, and her colours swapped."""
    folder = tmp_path_factory.mktemp("faces")
    a, b = folder / "a.png", folder / "b.png"
    image = Image.open(PHOTO).convert("RGB")
    image.save(a)
    Image.fromarray(np.asarray(image)[:, :, ::-1].copy()).save(b)
    return a, b


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_concurrent_requests_with_different_faces_never_mix(server, faces):
    from gradio_client import Client

    a, b = faces
    reference = {
        face: pixels(call(Client(server, verbose=False), id_image=face, seed="9").image) for face in faces
    }
    assert not np.array_equal(reference[a], reference[b])  # the two identities really differ

    results, errors = [], []

    def user(face):
        try:
            client = Client(server, verbose=False)
            for _ in range(2):
                results.append((face, pixels(call(client, id_image=face, seed="9").image)))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=user, args=(face,)) for face in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 8
    assert all(np.array_equal(image, reference[face]) for face, image in results)


def test_files_outside_the_app_cannot_be_read(server):
    for path in ["/etc/passwd", "../../../../etc/passwd", str(PHOTO)]:
        response = httpx.get(f"{server}gradio_api/file={path}")
        assert response.status_code in (403, 404), (path, response.status_code)
        assert b"root:" not in response.content


def test_uploads_are_limited_in_size(server):
    big = b"\0" * (21 * 2**20)  # over the app's 20 MB limit
    response = httpx.post(f"{server}gradio_api/upload", files={"files": ("big.png", big, "image/png")})
    assert response.status_code >= 400


class Exploit:
    """A pickle that would create a file if it were ever unpickled."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_checkpoints_are_never_unpickled_with_arbitrary_code(tmp_path):
    from eva_clip.model import load_eva_clip

    marker = tmp_path / "pwned"
    path = tmp_path / "EVA02_CLIP_L_336_psz14_s6B.pt"
    torch.save(
        {"visual.cls_token": torch.zeros(1), "payload": Exploit(marker)},
        path,
        pickle_protocol=pickle.HIGHEST_PROTOCOL,
    )
    from flux.checkpoint import CheckpointError

    # refused while unpickling (weights_only), by name, before any of its code could run
    with pytest.raises(
        CheckpointError, match=r"EVA02_CLIP_L_336_psz14_s6B\.pt could not be read.*UnpicklingError"
    ):
        load_eva_clip(path, "cpu", torch.float32)
    assert not marker.exists()


@pytest.mark.parametrize("role", ["retinaface", "bisenet", "parsenet"])
def test_a_face_model_file_with_code_is_refused_by_name_and_nothing_runs(tmp_path, models_dir, role):
    from flux.checkpoint import CheckpointError
    from pulid.face_analysis import load_face_analyzer
    from tiny_random.pipeline import tiny_face_model_paths

    marker = tmp_path / "pwned"
    paths = {}
    for name, path in tiny_face_model_paths(models_dir).items():
        paths[name] = tmp_path / path.parent.name / path.name
        paths[name].parent.mkdir(exist_ok=True)
        paths[name].write_bytes(path.read_bytes())
    state = torch.load(paths[role], weights_only=True)
    torch.save({**state, "payload": Exploit(marker)}, paths[role])  # real weights plus a payload
    with pytest.raises(
        CheckpointError, match="plain facexlib weights: it holds objects other than"
    ) as caught:
        load_face_analyzer(paths, onnx_provider="cpu", device="cpu")
    assert str(paths[role]) in str(caught.value) and not marker.exists()


def test_an_onnx_model_pointing_at_another_file_is_refused(tmp_path, models_dir):
    import onnx
    from onnx.external_data_helper import set_external_data

    from flux.checkpoint import CheckpointError
    from pulid.face_detection import FaceDetector

    folder = models_dir / "antelopev2"
    model = onnx.load(str(folder / "glintr100.onnx"))
    tensor = model.graph.initializer[0]
    set_external_data(tensor, location="/etc/passwd")  # the weights "live" in a file of the server
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    (tmp_path / "glintr100.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(CheckpointError, match="refers to external data") as caught:
        FaceDetector(folder / "scrfd_10g_bnkps.onnx", tmp_path / "glintr100.onnx", onnx_provider="cpu")
    assert str(tmp_path / "glintr100.onnx") in str(caught.value)


@pytest.mark.parametrize(
    "requests",
    [pytest.param(10, id="10 requests"), pytest.param(40, id="40 requests, memory", marks=pytest.mark.slow)],
)
def test_short_soak_has_no_crash_no_unexpected_error_and_no_memory_growth(requests):
    """Mixed good and hostile requests against a fresh server. The fast tier's 10 requests check
    the outcomes; the slow tier's 40 also see whether the server's memory settles."""
    from scripts.soak import main as soak

    report = soak(["--requests", str(requests), "--clients", "2", "--seed", "3"])
    assert report["crashes"] == 0 and report["unexpected_messages"] == []
    assert report["outcomes"].get("image", 0) >= requests // 2 and "path_was_read" not in report["outcomes"]
    assert report["files_left_elsewhere"] == []  # nothing written outside the upload and output folders
    if requests < 40:
        return
    samples = [rss for _, rss in report["server_rss_mib_by_request"]]
    settled = samples[len(samples) // 2]  # after the first half: every input size has been seen once
    assert samples[-1] - settled < 150, samples
