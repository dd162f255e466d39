"""Face analysis of the ID image, through the real insightface, onnxruntime and facexlib code.

The models are small stand-ins built at test time (``tiny_random/face_models.py`` says what
each one does); the photo is scikit-image's public-domain astronaut portrait.
"""

from __future__ import annotations

import logging
import os
import warnings

import cv2
import numpy as np
import pytest
import torch
from skimage import data as skimage_data  # a test dependency: its photo is the real face

from eva_clip.model import EVA_CLIP_MEAN as CLIP_MEAN
from eva_clip.model import EVA_CLIP_STD as CLIP_STD
from flux.checkpoint import CheckpointError
from pulid import face_detection
from pulid.errors import InvalidImageError, NoFaceError
from pulid.face_alignment import BACKGROUND_LABELS, MIN_IOU, FaceAligner, box_iou
from pulid.face_analysis import FaceAnalyzer, _common_folder, load_face_analyzer, prepare_image
from pulid.face_detection import DetectedFace, DetectionAttempt, FaceDetector, largest_face, onnx_providers
from tiny_random.face_models import (
    ASTRONAUT_FACE,
    FaceSpec,
    arcface_reference,
    build_antelopev2,
)
from tiny_random.pipeline import tiny_face_model_paths

NO_FACE_MESSAGE = "No face found in the ID image. Upload a clear, front-facing photo of one person."
# facexlib's FFHQ 5-point template at 512 (FaceRestoreHelper, template_3points=False)
FFHQ_TEMPLATE = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float32,
)


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    return skimage_data.astronaut()


@pytest.fixture(scope="session")
def analyzer(models_dir) -> FaceAnalyzer:
    return load_face_analyzer(tiny_face_model_paths(models_dir), onnx_provider="cpu", device="cpu")


@pytest.fixture(scope="session")
def astronaut_result(analyzer, astronaut):
    return analyzer.analyze(astronaut)


@pytest.fixture(scope="session")
def detector_factory(tmp_path_factory):
    """Build an antelopev2 folder whose SCRFD reports ``faces`` under ``options``; load it."""
    count = iter(range(1000))

    def make(faces=(ASTRONAUT_FACE,), **options) -> FaceDetector:
        folder = build_antelopev2(tmp_path_factory.mktemp(f"antelope{next(count)}"), faces, **options)
        return FaceDetector(folder / "scrfd_10g_bnkps.onnx", folder / "glintr100.onnx", onnx_provider="cpu")

    return make


def analyzer_with(detector: FaceDetector, analyzer: FaceAnalyzer) -> FaceAnalyzer:
    return FaceAnalyzer(detector, analyzer.aligner)


def spy_attempts(monkeypatch, detector: FaceDetector) -> list[DetectionAttempt]:
    """Record every detector run of ``detector``."""
    seen: list[DetectionAttempt] = []
    real = detector.detect_once

    def recording(image, attempt):
        seen.append(attempt)
        return real(image, attempt)

    monkeypatch.setattr(detector, "detect_once", recording)
    return seen


def place(face: FaceSpec, scale: float, offset: tuple[float, float], canvas: tuple[int, int]) -> FaceSpec:
    """``face`` of a 512x512 image pasted at ``offset`` with ``scale`` into a (w, h) canvas."""
    w, h = canvas

    def move(x: float, y: float) -> tuple[float, float]:
        return (offset[0] + x * 512 * scale) / w, (offset[1] + y * 512 * scale) / h

    (x1, y1), (x2, y2) = move(*face.box[:2]), move(*face.box[2:])
    return FaceSpec((x1, y1, x2, y2), tuple(move(x, y) for x, y in face.kps))


def arcface_of(image_rgb: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """Independent ArcFace fixture output: insightface's ArcFace-template crop, then numpy."""
    from insightface.utils import face_align

    with warnings.catch_warnings():  # scikit-image's estimate() deprecation inside norm_crop
        warnings.simplefilter("ignore", FutureWarning)
        crop = face_align.norm_crop(np.ascontiguousarray(image_rgb[:, :, ::-1]), landmark=kps, image_size=112)
    return arcface_reference(crop)


# ----------------------------------------------------------------------------------------------
# The whole path on the astronaut


def test_astronaut_gives_embedding_clip_input_and_box(astronaut_result):
    r = astronaut_result
    assert r.arcface_embedding.shape == (512,) and r.arcface_embedding.dtype == np.float32
    assert np.isfinite(r.arcface_embedding).all() and np.linalg.norm(r.arcface_embedding) > 0
    assert tuple(r.clip_input.shape) == (1, 3, 336, 336) and r.clip_input.dtype == torch.float32
    np.testing.assert_allclose(r.bbox, ASTRONAUT_FACE.box_in(512, 512), atol=1.0)
    assert r.num_faces == 1 and r.det_score == pytest.approx(0.9)
    assert (r.embedding_source, r.alignment_source, r.attempt) == (
        "insightface",
        "facexlib",
        "det_size 640",
    )
    assert r.aligned_face.shape == (512, 512, 3) and r.aligned_face.dtype == np.uint8
    assert r.parsed_face.shape == (512, 512, 3) and r.parsing.shape == (512, 512)
    assert len(r.debug_images) == 3 and r.debug_images[1] is r.aligned_face
    assert [caption for _, caption in r.debug_gallery] == [
        "detected face",
        "aligned face",
        "face features (EVA-CLIP input)",
    ]
    assert r.face_crop.shape == (104, 92, 3)


def test_same_image_gives_same_result_twice(analyzer, astronaut, astronaut_result):
    again = analyzer.analyze(astronaut)
    np.testing.assert_array_equal(again.arcface_embedding, astronaut_result.arcface_embedding)
    assert torch.equal(again.clip_input, astronaut_result.clip_input)


def test_embedding_is_arcface_of_insightface_keypoints(astronaut_result, astronaut):
    expected = arcface_of(astronaut, ASTRONAUT_FACE.kps_in(512, 512))
    np.testing.assert_allclose(astronaut_result.arcface_embedding, expected, rtol=1e-4, atol=1e-4)


def test_chosen_box_agrees_with_an_independent_haar_detector(astronaut_result, astronaut):
    cascade = cv2.CascadeClassifier(
        os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
    )
    found = cascade.detectMultiScale(cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY), 1.1, 5)
    assert len(found) == 1
    x, y, w, h = found[0]
    assert box_iou(astronaut_result.bbox, (x, y, x + w, y + h)) > 0.6
    cx, cy = astronaut_result.landmarks.mean(axis=0)
    assert x < cx < x + w and y < cy < y + h


def test_facexlib_aligns_the_face_insightface_chose(analyzer, astronaut, astronaut_result):
    bgr = np.ascontiguousarray(astronaut[:, :, ::-1])
    box, kps = ASTRONAUT_FACE.box_in(512, 512), ASTRONAUT_FACE.kps_in(512, 512)
    alignment = analyzer.aligner.align_to(bgr, box, kps)
    assert alignment.source == "facexlib"
    assert alignment.iou >= MIN_IOU
    assert alignment.iou == pytest.approx(box_iou(alignment.box, box))
    np.testing.assert_allclose(astronaut_result.landmarks, alignment.landmarks, atol=1e-4)
    assert not np.allclose(alignment.landmarks, kps, atol=1.0)  # RetinaFace's own points, not SCRFD's
    x1, y1, x2, y2 = box
    assert ((alignment.landmarks >= [x1, y1]) & (alignment.landmarks <= [x2, y2])).all()


def test_alignment_takes_the_retinaface_box_overlapping_most_else_insightface_keypoints(
    analyzer, monkeypatch
):
    image = np.zeros((300, 300, 3), np.uint8)
    target = np.array([100, 100, 200, 200], np.float32)  # crop: side 200 from (50, 50), 1.92x to 384
    kps = np.array([[130, 140], [170, 140], [150, 160], [135, 180], [165, 180]], np.float32)

    def in_crop(box, shift):  # a RetinaFace detection of ``box`` moved by ``shift``, in crop pixels
        box = (np.asarray(box, np.float32) + [shift, shift, shift, shift] - 50) * 1.92
        return np.append(box, 0.99).astype(np.float32), (kps + shift - 50) * 1.92

    found: list = []
    monkeypatch.setattr(analyzer.aligner, "detect", lambda crop: found)
    found[:] = [in_crop(target, 40), in_crop(target, 150), in_crop(target, 8)]
    alignment = analyzer.aligner.align_to(image, target, kps)
    assert alignment.source == "facexlib"
    np.testing.assert_allclose(alignment.box, target + 8, atol=1e-3)
    np.testing.assert_allclose(alignment.landmarks, kps + 8, atol=1e-3)
    assert alignment.iou == pytest.approx(box_iou(target + 8, target))
    found[:] = [in_crop(target, 60)]  # IoU 0.14: another face
    alignment = analyzer.aligner.align_to(image, target, kps)
    assert alignment.source == "insightface" and alignment.box is None
    np.testing.assert_array_equal(alignment.landmarks, kps)
    assert alignment.aligned_bgr.shape == (512, 512, 3)


def test_aligned_face_is_the_ffhq_warp_of_the_landmarks(astronaut_result, astronaut):
    r = astronaut_result
    matrix = cv2.estimateAffinePartial2D(r.landmarks, FFHQ_TEMPLATE, method=cv2.LMEDS)[0]
    expected = cv2.warpAffine(astronaut, matrix, (512, 512), borderValue=(132, 133, 135))
    assert np.abs(expected.astype(int) - r.aligned_face.astype(int)).mean() < 0.5


def test_parsing_is_bisenet_on_the_aligned_face(astronaut_result, models_dir):
    from facexlib.parsing import init_parsing_model
    from torchvision.transforms.functional import normalize

    bisenet = init_parsing_model("bisenet", device="cpu", model_rootpath=str(models_dir / "facexlib"))
    face = torch.from_numpy(astronaut_result.aligned_face).permute(2, 0, 1)[None].float() / 255.0
    with torch.no_grad():
        logits = bisenet(normalize(face, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))[0]
    np.testing.assert_array_equal(logits.argmax(dim=1)[0].numpy(), astronaut_result.parsing)


def test_background_is_white_and_the_face_grey(astronaut_result):
    r = astronaut_result
    background = np.isin(r.parsing, BACKGROUND_LABELS)
    assert 0.01 < background.mean() < 0.99  # the fixture parser gives both kinds of label
    assert (r.parsed_face[background] == 255).all()
    face = r.parsed_face[~background]
    assert (face[:, 0] == face[:, 1]).all() and (face[:, 1] == face[:, 2]).all()
    assert (face[:, 0] < 250).mean() > 0.9


def test_clip_input_matches_an_independent_recomputation(astronaut_result):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import normalize, resize

    r = astronaut_result
    rgb = r.aligned_face.astype(np.float64) / 255.0
    grey = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    grey[np.isin(r.parsing, BACKGROUND_LABELS)] = 1.0
    features = torch.from_numpy(np.repeat(grey[None, None], 3, axis=1)).float()
    np.testing.assert_allclose(r.parsed_face[..., 0], np.round(grey * 255), atol=1)
    expected = normalize(
        resize(features, [336, 336], InterpolationMode.BICUBIC, antialias=True), CLIP_MEAN, CLIP_STD
    )
    torch.testing.assert_close(r.clip_input.cpu(), expected, atol=1e-5, rtol=1e-5)
    # where the parsing map is background over the whole bicubic footprint, the input is pure white
    core = cv2.erode(np.isin(r.parsing, BACKGROUND_LABELS).astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    src = np.clip(np.round((np.arange(336) + 0.5) * 512 / 336 - 0.5).astype(int), 0, 511)
    inside = core[np.ix_(src, src)]
    assert inside.sum() > 50
    white = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(
        r.clip_input[0][:, torch.from_numpy(inside)].T, white.expand(int(inside.sum()), 3)
    )


# ----------------------------------------------------------------------------------------------
# Several faces, retries, fallback, no face


def test_several_faces_the_largest_is_used_and_facexlib_aligns_it(detector_factory, analyzer, astronaut):
    canvas_size = (1024, 600)  # not resized: the embedding can be recomputed on the same pixels
    canvas = np.full((canvas_size[1], canvas_size[0], 3), 120, np.uint8)
    canvas[95:505, 0:410] = cv2.resize(astronaut, (410, 410), interpolation=cv2.INTER_AREA)  # large, left
    canvas[197:402, 420:625] = cv2.resize(
        astronaut, (205, 205), interpolation=cv2.INTER_AREA
    )  # small, centre
    large = place(ASTRONAUT_FACE, 410 / 512, (0, 95), canvas_size)
    small = place(ASTRONAUT_FACE, 205 / 512, (420, 197), canvas_size)
    detector = detector_factory([small, large])
    r = analyzer_with(detector, analyzer).analyze(canvas)
    assert r.num_faces == 2 and "2 faces found" in r.notes[0]
    np.testing.assert_allclose(r.bbox, large.box_in(*canvas_size), atol=1.5)
    faces, _ = detector.detect(np.ascontiguousarray(canvas[:, :, ::-1]))
    sizes = sorted(f.bbox[2] - f.bbox[0] for f in faces)
    assert sizes[1] > 1.9 * sizes[0]
    np.testing.assert_allclose(
        r.arcface_embedding, arcface_of(canvas, largest_face(faces).kps), rtol=1e-4, atol=1e-4
    )
    # facexlib's official rule (centre-most face) would take the small face; ours aligns the large one
    assert r.alignment_source == "facexlib"
    cx, cy = r.landmarks.mean(axis=0)
    x1, y1, x2, y2 = r.bbox
    assert x1 < cx < x2 and y1 < cy < y2
    sx1, sy1, sx2, sy2 = small.box_in(*canvas_size)
    assert not (sx1 - 50 < cx < sx2 + 50)


def test_largest_face_is_by_box_area():
    def face(x1, y1, x2, y2):
        return DetectedFace(np.array([x1, y1, x2, y2], np.float32), np.zeros((5, 2), np.float32), 0.9)

    faces = [face(0, 0, 10, 100), face(50, 50, 90, 90), face(0, 0, 30, 30)]
    assert largest_face(faces) is faces[1]
    with pytest.raises(ValueError):
        largest_face([])


def test_retry_at_smaller_det_size(detector_factory, analyzer, astronaut, monkeypatch):
    detector = detector_factory(max_det_size=320)  # this fixture detects only at det sizes <= 320
    seen = spy_attempts(monkeypatch, detector)
    r = analyzer_with(detector, analyzer).analyze(astronaut)
    assert [a.det_size for a in seen] == [640, 480, 320]
    assert r.attempt == "det_size 320"
    np.testing.assert_allclose(r.bbox, ASTRONAUT_FACE.box_in(512, 512), atol=1.0)


def test_face_too_large_for_640_is_found_at_480(detector_factory, astronaut, monkeypatch):
    detector = detector_factory(max_face_px=100)  # the face is 115 px of a 640 input, 86 of 480
    seen = spy_attempts(monkeypatch, detector)
    faces, attempt = detector.detect(np.ascontiguousarray(astronaut[:, :, ::-1]))
    assert attempt == DetectionAttempt(480) and [a.det_size for a in seen] == [640, 480]
    np.testing.assert_allclose(faces[0].bbox, ASTRONAUT_FACE.box_in(512, 512), atol=1.0)


def test_padded_image_is_tried_last_and_boxes_map_back(detector_factory, analyzer, astronaut, monkeypatch):
    detector = detector_factory(max_face_px=40)  # only the padded image at 320 makes the face small enough
    seen = spy_attempts(monkeypatch, detector)
    r = analyzer_with(detector, analyzer).analyze(astronaut)
    pad = round(0.3 * 512)
    assert seen == [DetectionAttempt(s) for s in (640, 480, 320)] + [
        DetectionAttempt(s, pad) for s in (640, 480, 320)
    ]
    assert r.attempt == f"det_size 320 on the image with a {pad}px border"
    np.testing.assert_allclose(r.bbox, ASTRONAUT_FACE.box_in(512, 512), atol=2.0)
    np.testing.assert_allclose(
        r.arcface_embedding, arcface_of(astronaut, ASTRONAUT_FACE.kps_in(512, 512)), atol=0.05
    )


def test_small_face_in_a_big_photo_is_found_at_a_larger_det_size(
    detector_factory, analyzer, astronaut, monkeypatch
):
    photo = np.zeros(
        (1024, 1024, 3), np.uint8
    )  # black surround: the fixture's content box stays the astronaut
    photo[256:768, 256:768] = astronaut
    detector = detector_factory(min_face_px=80)  # the 92 px face is < 80 px below det_size 1024
    seen = spy_attempts(monkeypatch, detector)
    r = analyzer_with(detector, analyzer).analyze(photo)
    assert [a.det_size for a in seen] == [640, 480, 320, 1024] and r.attempt == "det_size 1024"
    np.testing.assert_allclose(r.bbox, ASTRONAUT_FACE.box_in(512, 512) + 256, atol=2.0)
    assert not any("small" in note for note in r.notes)  # 92 px is not "small"


def test_big_image_is_resized_and_box_returned_in_its_own_pixels(analyzer, astronaut):
    big = cv2.resize(astronaut, (1536, 1536), interpolation=cv2.INTER_CUBIC)
    r = analyzer.analyze(big)
    np.testing.assert_allclose(r.bbox, ASTRONAUT_FACE.box_in(1536, 1536), atol=3.0)
    np.testing.assert_allclose(
        r.landmarks.mean(axis=0), ASTRONAUT_FACE.kps_in(1536, 1536).mean(axis=0), atol=40
    )


def test_no_face_raises_no_face_error(analyzer, monkeypatch):
    seen = spy_attempts(monkeypatch, analyzer.detector)
    with pytest.raises(NoFaceError) as caught:
        analyzer.analyze(np.full((400, 300, 3), 128, np.uint8))
    assert caught.value.user_message == NO_FACE_MESSAGE
    assert str(caught.value) == NO_FACE_MESSAGE and caught.value.detail
    assert isinstance(caught.value, ValueError)
    assert len(seen) == 6  # 640, 480, 320, then the same three on the padded image


def test_facexlib_fallback_when_insightface_finds_nothing(detector_factory, analyzer, astronaut):
    r = analyzer_with(detector_factory(faces=()), analyzer).analyze(astronaut)
    assert r.embedding_source == "facexlib" and r.attempt == "facexlib fallback"
    assert any("facexlib" in note for note in r.notes)
    np.testing.assert_allclose(r.arcface_embedding, arcface_of(astronaut, r.landmarks), rtol=1e-4, atol=1e-4)
    assert tuple(r.clip_input.shape) == (1, 3, 336, 336)


# ----------------------------------------------------------------------------------------------
# Input checks, providers, weights


@pytest.mark.parametrize(
    "bad",
    [
        None,
        np.zeros((0, 0, 3), np.uint8),
        np.zeros((20, 400, 3), np.uint8),
        np.zeros((64, 64, 5), np.uint8),
        np.zeros((64, 64, 3), object),
        np.full((64, 64, 3), np.nan, np.float32),
        np.zeros((64, 64, 3), bool),
        "not an image",
    ],
)
def test_unusable_input_raises_invalid_image_error(bad, analyzer):
    with pytest.raises(InvalidImageError) as caught:
        analyzer.analyze(bad)
    assert caught.value.user_message


def test_grey_rgba_float_and_pil_inputs_are_converted():
    from PIL import Image

    grey = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    assert prepare_image(grey.astype(np.uint8)).shape == (64, 64, 3)
    assert prepare_image(grey * 16).max() == 255  # 16-bit scaled down
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = 200
    assert (prepare_image(rgba)[..., 0] == 200).all()
    assert prepare_image(np.full((64, 64, 3), 0.5, np.float32))[0, 0, 0] == 128
    pil = Image.new("L", (40, 50), 7)
    converted = prepare_image(pil)
    assert converted.shape == (50, 40, 3) and converted.dtype == np.uint8 and (converted == 7).all()


def test_onnx_providers_for_cpu_and_gpu(monkeypatch, caplog):
    import onnxruntime

    assert onnx_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(ValueError):
        onnx_providers("tpu")
    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    with caplog.at_level(logging.INFO, logger="pulid.face_detection"):
        assert onnx_providers("gpu") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert not caplog.records


def test_gpu_without_onnxruntime_gpu_warns_and_logs_real_providers(models_dir, monkeypatch, caplog):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(face_detection, "_gpu_warned", False)
    folder = models_dir / "antelopev2"
    with caplog.at_level(logging.INFO, logger="pulid.face_detection"):
        detector = FaceDetector(
            folder / "scrfd_10g_bnkps.onnx", folder / "glintr100.onnx", onnx_provider="gpu"
        )
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "onnxruntime-gpu" in warned[0].getMessage()
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("detector" in m and "CPUExecutionProvider" in m for m in infos)
    assert any("recognizer" in m and "CPUExecutionProvider" in m for m in infos)
    assert detector.providers == {
        "detector": ["CPUExecutionProvider"],
        "recognizer": ["CPUExecutionProvider"],
    }


def test_onnxruntime_threads_sleep_when_idle_unless_asked(models_dir):
    """Spinning idle onnxruntime threads starved torch's pool (the ID stage took up to 5 s on a
    16-core host): insightface's sessions are made with spinning off, and the options given win."""
    paths = tiny_face_model_paths(models_dir)

    def spinning(detector: FaceDetector) -> set[str]:
        entries = set()
        for model in (detector.detector, detector.recognizer):
            options = model.session.get_session_options()
            for pool in ("intra_op", "inter_op"):
                entries.add(options.get_session_config_entry(f"session.{pool}.allow_spinning"))
        return entries

    assert spinning(load_face_analyzer(paths, onnx_provider="cpu").detector) == {"0"}
    asked = face_detection.onnx_session_options(spinning=True, threads=2)
    detector = FaceDetector(paths["detector"], paths["recognizer"], "cpu", session_options=asked)
    assert spinning(detector) == {"1"}
    assert detector.detector.session.get_session_options().intra_op_num_threads == 2


def test_model_files_swapped_are_refused(models_dir):
    folder = models_dir / "antelopev2"
    with pytest.raises(CheckpointError, match="not an insightface detection model"):
        FaceDetector(folder / "glintr100.onnx", folder / "scrfd_10g_bnkps.onnx", onnx_provider="cpu")


@pytest.mark.parametrize("role", ["detector", "recognizer", "retinaface", "bisenet", "parsenet"])
def test_a_truncated_model_file_is_named(models_dir, tmp_path, role):
    paths = {}
    for name, path in tiny_face_model_paths(models_dir).items():
        paths[name] = tmp_path / path.parent.name / path.name
        paths[name].parent.mkdir(exist_ok=True)
        data = path.read_bytes()
        paths[name].write_bytes(data[: len(data) // 3] if name == role else data)
    with pytest.raises(CheckpointError, match="truncated or corrupt") as caught:
        load_face_analyzer(paths, onnx_provider="cpu", device="cpu")
    assert str(paths[role]) in str(caught.value)


def test_the_analyzer_constructor_does_no_io(analyzer, monkeypatch):
    import builtins

    def no_io(*args, **kwargs):
        raise AssertionError("FaceAnalyzer() opened a file")

    monkeypatch.setattr(builtins, "open", no_io)
    made = FaceAnalyzer(analyzer.detector, analyzer.aligner, max_side=512)
    assert made.detector is analyzer.detector and made.max_side == 512


def test_facexlib_files_from_different_folders_are_gathered(tmp_path):
    a, b = tmp_path / "a" / "detection_Resnet50_Final.pth", tmp_path / "b" / "parsing_bisenet.pth"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(b"x")
    assert _common_folder([a, a.parent / "other.pth"]) == a.parent
    folder = _common_folder([a, b])
    assert sorted(os.listdir(folder)) == ["detection_Resnet50_Final.pth", "parsing_bisenet.pth"]
    assert (folder / "parsing_bisenet.pth").resolve() == b.resolve()


def test_aligner_loads_from_its_folder_without_downloading(models_dir, monkeypatch):
    import facexlib.utils.misc as misc

    def no_download(*args, **kwargs):
        raise AssertionError("facexlib tried to download")

    monkeypatch.setattr(misc, "download_url_to_file", no_download)
    aligner = FaceAligner(models_dir / "facexlib", "cpu")
    assert aligner.helper.face_parse.__class__.__name__ == "BiSeNet"
