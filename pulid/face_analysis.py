"""Face analysis of the ID image: ArcFace embedding, EVA-CLIP input and the chosen face's box.

This is ``PuLIDPipeline.get_id_embedding`` of the official PuLID-FLUX code up to (not including)
EVA-CLIP, made robust:

* one face drives everything: the largest face insightface finds (by box area, as officially)
  gives the ArcFace embedding, and facexlib aligns *that* face (highest IoU with insightface's box,
  :meth:`pulid.face_alignment.FaceAligner.align_to`) instead of its own centre-most face;
* several faces: the largest is used, and its box is returned so the UI can show which;
* detection retries at other sizes and on a padded image before giving up
  (:func:`pulid.face_detection.detection_attempts`);
* as officially, when insightface finds no face at all but facexlib does, facexlib's largest face
  is used; its ArcFace embedding is taken on the ArcFace template crop of its landmarks
  (the official code resized the 512 FFHQ crop to 112, which ArcFace was not trained on);
* no face -> :class:`~pulid.errors.NoFaceError`; unusable input -> :class:`~pulid.errors.InvalidImageError`.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Union

import cv2
import numpy as np
import torch

from pulid.errors import InvalidImageError, NoFaceError
from pulid.face_alignment import Alignment, FaceAligner, tensor_to_rgb8
from pulid.face_detection import DetectedFace, FaceDetector, largest_face

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

logger = logging.getLogger(__name__)

ImageLike = Union[np.ndarray, "PILImage"]  # an RGB photo: HxWx3 uint8 array (grey, RGBA, float ok) or PIL

MAX_SIDE = 1024  # the official app resizes the ID image so that its long side is at most 1024
MIN_SIDE = 32  # smaller images cannot hold a face the models can use
SMALL_FACE_PX = 64  # below this the identity is weak; the result says so


@dataclass(frozen=True)
class FaceAnalysis:
    """Everything PuLID needs from the ID image, plus what the UI shows about it.

    Coordinates (``bbox``, ``landmarks``) are in the pixels of the image given to
    :meth:`FaceAnalyzer.analyze`, before any resizing.
    """

    arcface_embedding: np.ndarray  # (512,) float32 ArcFace (glintr100) vector, not normalised
    clip_input: torch.Tensor  # (1, 3, 336, 336) float32, CLIP-normalised, on the parser's device
    bbox: tuple[float, float, float, float]  # the chosen face: x1, y1, x2, y2
    det_score: float  # detector confidence of the chosen face
    num_faces: int  # faces found; the largest was chosen
    landmarks: np.ndarray  # (5, 2) float32: the landmarks the 512 alignment used
    aligned_face: np.ndarray  # (512, 512, 3) uint8 RGB: the FFHQ-aligned face
    parsed_face: np.ndarray  # (512, 512, 3) uint8 RGB: grey face features on white, before resizing
    parsing: np.ndarray  # (512, 512) uint8 BiSeNet labels of ``aligned_face``
    face_crop: np.ndarray  # (h, w, 3) uint8 RGB: the chosen box cut from the image
    embedding_source: str  # "insightface", or "facexlib" when only facexlib found a face
    alignment_source: str  # "facexlib", or "insightface" when RetinaFace did not match the face
    attempt: str  # which detection attempt found the face
    notes: tuple[str, ...] = field(default=())  # remarks for the user (several faces, small face...)

    @property
    def debug_gallery(self) -> list[tuple[np.ndarray, str]]:
        """(image, caption) pairs for the UI's debug gallery, in the official order."""
        return [
            (self.face_crop, "detected face"),
            (self.aligned_face, "aligned face"),
            (self.parsed_face, "face features (EVA-CLIP input)"),
        ]

    @property
    def debug_images(self) -> list[np.ndarray]:
        """The gallery's images alone (RGB uint8)."""
        return [image for image, _ in self.debug_gallery]


def prepare_image(image: ImageLike | None) -> np.ndarray:
    """The ID image as a contiguous RGB uint8 array, or :class:`InvalidImageError`.

    Accepts numpy arrays and PIL images; grey and RGBA are converted, 16-bit and float images
    (0..1 or 0..255) rescaled.
    """
    if image is None:
        raise InvalidImageError("No ID image was given. Upload a photo of the person.")
    if not isinstance(image, np.ndarray):
        try:
            image = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
        except Exception as err:  # noqa: BLE001 - any unreadable object is the same user error
            raise InvalidImageError(detail=f"cannot read a {type(image).__name__}") from err
    if image.dtype == object or image.size == 0 or image.ndim not in (2, 3):
        raise InvalidImageError(detail=f"array of shape {image.shape} and dtype {image.dtype}")
    if image.ndim == 3 and image.shape[2] not in (1, 3, 4):
        raise InvalidImageError(detail=f"{image.shape[2]} channels")
    if image.dtype == np.bool_ or not (
        np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)
    ):
        raise InvalidImageError(detail=f"dtype {image.dtype}")
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise InvalidImageError(detail="the image contains NaN or infinite values")
        image = image * 255.0 if image.max() <= 1.0 else image
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    elif image.dtype != np.uint8:
        top = 65535 if image.max() > 255 else 255
        image = np.clip(image.astype(np.float64) * (255.0 / top), 0, 255).round().astype(np.uint8)
    if image.ndim == 2 or image.shape[2] == 1:
        image = np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    if min(image.shape[0], image.shape[1]) < MIN_SIDE:
        raise InvalidImageError(
            f"The ID image is too small ({image.shape[1]}x{image.shape[0]} pixels). "
            "Upload a larger photo of the face.",
        )
    return np.ascontiguousarray(image)


def resize_long_side(image: np.ndarray, max_side: int = MAX_SIDE) -> tuple[np.ndarray, float]:
    """Shrink (never enlarge) so the long side is at most ``max_side``, as the official app does."""
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image, 1.0
    k = max_side / max(h, w)
    nh, nw = int(h * k), int(w * k)
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LANCZOS4)
    return resized, nw / w


class FaceAnalyzer:
    """insightface antelopev2 + facexlib, as PuLID-FLUX uses them, behind one ``analyze`` call.

    Made from loaded models (:func:`load_face_analyzer` loads them from files); the constructor
    does no I/O. One analyzer may be shared between threads (calls are serialised).
    """

    def __init__(self, detector: FaceDetector, aligner: FaceAligner, max_side: int = MAX_SIDE) -> None:
        self.detector = detector
        self.aligner = aligner
        self.max_side = int(max_side)
        self._lock = threading.Lock()

    def analyze(self, image: ImageLike) -> FaceAnalysis:
        """Analyse an RGB ID image (numpy uint8 or PIL); see the module docstring for the rules."""
        original, bgr, scale = self._prepared(image)
        with self._lock:
            return self._analyze(original, bgr, scale)

    def identity(self, image: ImageLike) -> np.ndarray | None:
        """The ArcFace embedding of the largest face insightface finds, or None: what a generated
        image is compared with the reference by (:mod:`pulid.similarity`)."""
        _, bgr, _ = self._prepared(image)
        with self._lock:
            faces, _ = self.detector.detect(bgr)
            if not faces:
                return None
            return np.asarray(self.detector.embedding(bgr, largest_face(faces).kps), np.float32)

    def face_box(self, image: ImageLike) -> tuple[float, float, float, float] | None:
        """The box (x1, y1, x2, y2, in the image's pixels) of the largest face insightface finds,
        or None: where "repaint the face" repaints a photo to start from."""
        _, bgr, scale = self._prepared(image)
        with self._lock:
            faces, _ = self.detector.detect(bgr)
        if not faces:
            return None
        return tuple(float(v) / scale for v in largest_face(faces).bbox[:4])

    def _prepared(self, image: ImageLike) -> tuple[np.ndarray, np.ndarray, float]:
        """The RGB image, its BGR copy with the long side at most ``max_side``, and that scale."""
        original = prepare_image(image)
        work, scale = resize_long_side(original, self.max_side)
        return original, np.ascontiguousarray(work[:, :, ::-1]), scale

    def _analyze(self, original: np.ndarray, bgr: np.ndarray, scale: float) -> FaceAnalysis:
        notes: list[str] = []
        faces, attempt = self.detector.detect(bgr)
        if faces:
            chosen = largest_face(faces)
            embedding = self.detector.embedding(bgr, chosen.kps)
            alignment = self.aligner.align_to(bgr, chosen.bbox, chosen.kps)
            embedding_source, attempt_text = "insightface", attempt.describe()
        else:  # the official fallback: facexlib alone, on the whole image
            found = [
                DetectedFace(bbox=box[:4], kps=lm, score=float(box[4]))
                for box, lm in self.aligner.detect(bgr)
            ]
            if not found:
                raise NoFaceError(detail="neither insightface nor facexlib detected a face")
            logger.warning(
                "insightface found no face; using facexlib's largest face, as the official code does"
            )
            faces, chosen = found, largest_face(found)
            embedding = self.detector.embedding(bgr, chosen.kps)
            alignment = Alignment(
                chosen.kps, self.aligner.warp(bgr, chosen.kps), "facexlib", chosen.bbox, 1.0
            )
            embedding_source, attempt_text = "facexlib", "facexlib fallback"
            notes.append("insightface found no face; facexlib's detection was used instead.")
        if len(faces) > 1:
            notes.append(f"{len(faces)} faces found; the largest one is used.")
        box, score = chosen.bbox, chosen.score

        parsing = self.aligner.parse(alignment.aligned_bgr)
        width = float(box[2] - box[0])  # in the analysed (resized) image, which is what the models see
        if width < SMALL_FACE_PX:
            notes.append(f"The face is small ({width:.0f} px wide); the likeness may be weak.")
        bbox = tuple(float(v) / scale for v in box[:4])
        x1, y1, x2, y2 = (int(round(v)) for v in bbox)
        h, w = original.shape[:2]
        crop = original[max(0, y1) : min(h, max(y2, y1 + 1)), max(0, x1) : min(w, max(x2, x1 + 1))].copy()
        return FaceAnalysis(
            arcface_embedding=np.asarray(embedding, np.float32),
            clip_input=parsing.clip_input,
            bbox=bbox,
            det_score=float(score),
            num_faces=len(faces),
            landmarks=(alignment.landmarks / scale).astype(np.float32),
            aligned_face=np.ascontiguousarray(alignment.aligned_bgr[:, :, ::-1]),
            parsed_face=tensor_to_rgb8(parsing.features),
            parsing=parsing.labels,
            face_crop=crop,
            embedding_source=embedding_source,
            alignment_source=alignment.source,
            attempt=attempt_text,
            notes=tuple(notes),
        )


def _common_folder(paths: list[Path]) -> Path:
    """A folder holding all ``paths`` under their own names (facexlib wants one model_rootpath).

    Usually that is ``<models_dir>/facexlib`` or one hub snapshot; when the files were found in
    different places, a temporary folder of symbolic links to them is made (removed at exit).
    """
    parents = {p.parent for p in paths}
    if len(parents) == 1:
        return parents.pop()
    folder = Path(tempfile.mkdtemp(prefix="pulid-facexlib-"))
    atexit.register(shutil.rmtree, folder, True)
    for p in paths:
        os.symlink(p.resolve(), folder / p.name)
    return folder


def load_face_analyzer(
    paths: Mapping[str, Path],
    onnx_provider: str = "gpu",
    device: str | torch.device = "cpu",
    max_side: int = MAX_SIDE,
    session_options=None,
) -> FaceAnalyzer:
    """Load the face models from files: ``paths`` maps the catalogue's roles (``detector``,
    ``recognizer``, ``retinaface``, ``bisenet``, ``parsenet``) to local files.

    ``onnx_provider`` ("gpu" or "cpu") picks onnxruntime's providers for insightface; ``device``
    is the torch device of facexlib's RetinaFace and BiSeNet. A file that is not the model it
    should be (truncated, another model) is a :class:`~flux.checkpoint.CheckpointError` naming it.
    ``session_options`` replaces :func:`~pulid.face_detection.onnx_session_options`'s.
    """
    detector = FaceDetector(
        paths["detector"], paths["recognizer"], onnx_provider, session_options=session_options
    )
    facexlib_files = [Path(paths[role]) for role in ("retinaface", "bisenet", "parsenet")]
    aligner = FaceAligner(_common_folder(facexlib_files), device)
    return FaceAnalyzer(detector, aligner, max_side)
