"""insightface antelopev2 for PuLID: SCRFD face detection with retries, and the ArcFace embedding.

The official PuLID-FLUX code runs ``FaceAnalysis(name='antelopev2').get(image_bgr)`` once, at
det_size 640, and uses the largest face's ``embedding``. This module does the same with the same
models (scrfd_10g_bnkps.onnx, glintr100.onnx) through insightface's own ``model_zoo`` routing,
``SCRFD.detect`` and ``ArcFaceONNX.get``, with two differences:

* it loads only the two files it needs, from wherever they were resolved, instead of every
  ``*.onnx`` in a folder;
* when no face is found it tries again (see :func:`detection_attempts`) before giving up:
  a smaller detector input (SCRFD misses faces that fill most of its input), a larger one for
  small faces in big photos, and finally the image with a black border around it (a face cut by
  the image edge gets the context the detector needs). The first attempt that finds a face wins.
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

logger = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
ONNX_PROVIDERS = {"gpu": (CUDA_PROVIDER, CPU_PROVIDER), "cpu": (CPU_PROVIDER,)}

DET_SIZES = (640, 480, 320)  # official size first, then smaller: big faces fit the anchors
LARGE_DET_SIZE = 1024  # for small faces in photos whose long side exceeds the first size
PAD_FRACTION = 0.3  # black border, as a fraction of the long side, on every side
DET_THRESH = 0.5  # insightface's default, as in the official pipeline

_gpu_warning_lock = threading.Lock()
_gpu_warned = False


def onnx_providers(onnx_provider: str) -> list[str]:
    """onnxruntime providers for ``"gpu"`` or ``"cpu"``, keeping only those this build has.

    The official code passes ``["CUDAExecutionProvider", "CPUExecutionProvider"]`` for ``gpu``;
    when the installed onnxruntime has no CUDA provider, onnxruntime silently runs on the CPU.
    Here that case is reported once, loudly, with the usual cause.
    """
    global _gpu_warned
    if onnx_provider not in ONNX_PROVIDERS:
        raise ValueError(f"onnx_provider must be 'gpu' or 'cpu', not {onnx_provider!r}")
    import onnxruntime

    available = list(onnxruntime.get_available_providers())
    wanted = [p for p in ONNX_PROVIDERS[onnx_provider] if p in available]
    if onnx_provider == "gpu" and CUDA_PROVIDER not in available:
        with _gpu_warning_lock:
            first = not _gpu_warned
            _gpu_warned = True
        logger.log(
            logging.WARNING if first else logging.INFO,
            "onnx_provider='gpu' was asked for, but this onnxruntime (%s) offers only %s: insightface "
            "face detection and ArcFace will run on the CPU. The GPU build is the separate package "
            "onnxruntime-gpu; onnxruntime and onnxruntime-gpu install into the same onnxruntime/ folder, "
            "so whichever was installed last wins. Uninstall both and install onnxruntime-gpu alone "
            "(insightface with --no-deps so that it does not pull the CPU build back).",
            getattr(onnxruntime, "__version__", "?"),
            available,
        )
    return wanted or [CPU_PROVIDER]


def onnx_session_options(spinning: bool = False, threads: int = 0):
    """onnxruntime session options for insightface's two models.

    Idle worker threads sleep rather than spin (onnxruntime spins by default). Why: the same
    process runs torch's CPU thread pool (facexlib and image preprocessing on a CPU, the CUDA
    launch thread on a GPU), and onnxruntime's pool of one thread per core spinning after each
    run starved it; with torch's pool this made the ID stage take 0.3 s to 5 s at random on a
    16-core host (``benchmarks/profile_id_stage.py``). ``threads`` 0 keeps onnxruntime's default.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    return options


def check_onnx_file(path: Path, task: str) -> None:
    """Parse an ONNX file before onnxruntime sees it: it must be a complete model whose weights are
    all inside it (a reference to external data could make onnxruntime read another file)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    from flux.checkpoint import CheckpointError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf and onnx raise their own types
        raise CheckpointError(
            f"{path} could not be loaded as the insightface {task} model ({type(err).__name__}: "
            f"{str(err)[:300]}). It may be truncated or corrupt: delete it and download it again."
        ) from err
    external = [t.name for t in model.graph.initializer if uses_external_data(t)]
    if external or not model.graph.node:
        reason = f"refers to external data ({', '.join(external[:3])})" if external else "has an empty graph"
        raise CheckpointError(f"{path} is not a self-contained insightface {task} model: it {reason}.")


def _load_onnx_model(model_zoo, path: str | Path, task: str, providers: list[str], options=None):
    """An insightface model from an ONNX file, or a CheckpointError naming the file."""
    from flux.checkpoint import CheckpointError

    path = Path(path)
    check_onnx_file(path, task)
    try:
        model = model_zoo.get_model(str(path), providers=providers, sess_options=options)
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
        raise CheckpointError(
            f"{path} could not be loaded as the insightface {task} model ({type(err).__name__}: "
            f"{str(err)[:300]}). It may be truncated or corrupt: delete it and download it again."
        ) from err
    if getattr(model, "taskname", None) != task:  # get_model gives None for unknown graphs
        raise CheckpointError(
            f"{path} is not an insightface {task} model "
            f"(insightface took it for {getattr(model, 'taskname', 'nothing it knows')!r})"
        )
    return model


def _session_providers(model) -> list[str]:
    session = getattr(model, "session", None)
    getter = getattr(session, "get_providers", None)
    return list(getter()) if callable(getter) else []


@dataclass(frozen=True)
class DetectedFace:
    """One SCRFD detection in the coordinates of the image given to :meth:`FaceDetector.detect`."""

    bbox: np.ndarray  # (4,) float32: x1, y1, x2, y2
    kps: np.ndarray  # (5, 2) float32: eyes, nose tip, mouth corners (subject's right first)
    score: float

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = (float(v) for v in self.bbox)
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)


@dataclass(frozen=True)
class DetectionAttempt:
    """One detector run: square detector input size and black border (pixels, each side)."""

    det_size: int
    pad: int = 0

    def describe(self) -> str:
        where = f" on the image with a {self.pad}px border" if self.pad else ""
        return f"det_size {self.det_size}{where}"


def detection_attempts(
    image_shape: Sequence[int],
    det_sizes: Sequence[int] = DET_SIZES,
    large_det_size: int = LARGE_DET_SIZE,
    pad_fraction: float = PAD_FRACTION,
) -> list[DetectionAttempt]:
    """The retry schedule for an image of ``image_shape`` (height, width, ...).

    Order: every size in ``det_sizes`` (640, 480, 320 by default); then, when the long side is
    larger than the first size, one run at up to ``large_det_size`` for small faces; then every
    size again on the image with a black border of ``pad_fraction`` x long side.
    """
    long_side = max(int(image_shape[0]), int(image_shape[1]))
    attempts = [DetectionAttempt(int(s)) for s in det_sizes]
    if det_sizes and long_side > det_sizes[0] and large_det_size > det_sizes[0]:
        large = min(int(large_det_size), 32 * math.ceil(long_side / 32))
        attempts.append(DetectionAttempt(large))
    pad = int(round(pad_fraction * long_side))
    if pad > 0:
        attempts += [DetectionAttempt(int(s), pad) for s in det_sizes]
    return attempts


def largest_face(faces: Sequence[DetectedFace]) -> DetectedFace:
    """The face with the largest box area, as the official pipeline picks it (first on ties)."""
    if not faces:
        raise ValueError("no faces to choose from")
    return max(faces, key=lambda f: f.area)


class FaceDetector:
    """SCRFD detector and ArcFace recogniser of insightface's antelopev2 pack."""

    def __init__(
        self,
        detector_path: str | Path,
        recognizer_path: str | Path,
        onnx_provider: str = "gpu",
        det_thresh: float = DET_THRESH,
        det_sizes: Sequence[int] = DET_SIZES,
        large_det_size: int = LARGE_DET_SIZE,
        pad_fraction: float = PAD_FRACTION,
        session_options=None,
    ) -> None:
        from insightface import model_zoo

        providers = onnx_providers(onnx_provider)
        options = session_options if session_options is not None else onnx_session_options()
        self.det_sizes = tuple(int(s) for s in det_sizes)
        self.large_det_size = int(large_det_size)
        self.pad_fraction = float(pad_fraction)
        self.det_thresh = float(det_thresh)
        self.detector = _load_onnx_model(model_zoo, detector_path, "detection", providers, options)
        self.recognizer = _load_onnx_model(model_zoo, recognizer_path, "recognition", providers, options)
        first = self.det_sizes[0] if self.det_sizes else 640
        self.detector.prepare(0, input_size=(first, first), det_thresh=self.det_thresh)
        self.recognizer.prepare(0)
        self.providers = {
            "detector": _session_providers(self.detector),
            "recognizer": _session_providers(self.recognizer),
        }
        for role, active in self.providers.items():
            logger.info("insightface %s onnxruntime session providers: %s", role, active)
        if onnx_provider == "gpu" and CUDA_PROVIDER in providers:
            for role, active in self.providers.items():
                if CUDA_PROVIDER not in active:
                    logger.warning(
                        "insightface %s asked for CUDA but its session runs on %s: onnxruntime-gpu could not "
                        "load CUDA/cuDNN (check that their versions match this onnxruntime-gpu build).",
                        role,
                        active,
                    )

    def detect_once(self, image_bgr: np.ndarray, attempt: DetectionAttempt) -> list[DetectedFace]:
        """Run SCRFD once; boxes and keypoints come back in ``image_bgr``'s coordinates."""
        image = image_bgr
        if attempt.pad:
            p = attempt.pad
            image = cv2.copyMakeBorder(image_bgr, p, p, p, p, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        size = (attempt.det_size, attempt.det_size)
        bboxes, kpss = self.detector.detect(image, input_size=size, max_num=0)
        faces = []
        for i in range(bboxes.shape[0]):
            bbox = bboxes[i, :4].astype(np.float32) - attempt.pad
            if kpss is None:  # a detector without keypoints cannot align faces
                raise ValueError(
                    "the face detector model gives no keypoints; antelopev2's scrfd_10g_bnkps does"
                )
            kps = kpss[i].astype(np.float32) - attempt.pad
            faces.append(DetectedFace(bbox=bbox, kps=kps, score=float(bboxes[i, 4])))
        return faces

    def detect(self, image_bgr: np.ndarray) -> tuple[list[DetectedFace], DetectionAttempt | None]:
        """All faces of the first attempt that finds any, and that attempt (None: no face at all)."""
        for attempt in detection_attempts(
            image_bgr.shape, self.det_sizes, self.large_det_size, self.pad_fraction
        ):
            faces = self.detect_once(image_bgr, attempt)
            logger.debug("SCRFD %s: %d face(s)", attempt.describe(), len(faces))
            if faces:
                return faces, attempt
        return [], None

    def embedding(self, image_bgr: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """ArcFace (glintr100) embedding of the face with these five keypoints, (512,) float32.

        insightface aligns the 112x112 crop itself (``norm_crop`` on the ArcFace template); the
        vector is not normalised, exactly as ``face_info['embedding']`` in the official code.
        """
        from insightface.app.common import Face

        face = Face(bbox=None, kps=np.asarray(kps, dtype=np.float32), det_score=None)
        with warnings.catch_warnings():  # scikit-image's estimate() deprecation inside norm_crop
            warnings.simplefilter("ignore", FutureWarning)
            embedding = self.recognizer.get(image_bgr, face)
        return np.asarray(embedding, dtype=np.float32).reshape(-1)
