"""facexlib alignment and BiSeNet parsing of the chosen face, and EVA-CLIP's 336 input.

The official pipeline aligns with facexlib's ``FaceRestoreHelper`` (RetinaFace-ResNet50 landmarks,
FFHQ 512x512 template) and picks facexlib's *centre-most* face, independently of the face that
insightface chose for the ArcFace embedding; in a photo of several people the two halves of the
identity condition can then come from different people. Here facexlib aligns the face insightface
chose (see :meth:`FaceAligner.align_to` for the rule), and the parsing / grey / white-background /
bicubic-336 / CLIP-normalisation steps are those of ``get_id_embedding``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from eva_clip.model import EVA_CLIP_MEAN, EVA_CLIP_STD
from pulid.catalogue import FACEXLIB_FILES

logger = logging.getLogger(__name__)

FACE_SIZE = 512  # FaceRestoreHelper(face_size=512, crop_ratio=(1, 1)): FFHQ template at 512
PARSING_MEAN = (0.485, 0.456, 0.406)
PARSING_STD = (0.229, 0.224, 0.225)
# BiSeNet labels painted white: background, cloth, hat, ears, earring, neck, necklace.
BACKGROUND_LABELS = (0, 16, 18, 7, 8, 9, 14, 15)
CLIP_IMAGE_SIZE = 336  # EVA02-CLIP-L-14-336

CROP_CONTEXT = 2.0  # side of the square searched by RetinaFace, in insightface box sizes
CROP_SIZE = 384  # that square is resized to this many pixels (face about 190 px)
MIN_IOU = 0.3  # a RetinaFace box must overlap insightface's at least this much to be the same face
RETINAFACE_THRESHOLD = 0.97  # FaceRestoreHelper.get_face_landmarks_5's confidence threshold


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def to_gray(x: torch.Tensor) -> torch.Tensor:
    """BT.601 luma of an RGB batch, repeated on three channels (the official ``to_gray``)."""
    y = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    return y.repeat(1, 3, 1, 1)


def background_mask(labels: torch.Tensor) -> torch.Tensor:
    """True where a BiSeNet label map (N, 1, H, W) is background, clothes, ears, neck or jewellery."""
    return torch.isin(labels, torch.tensor(BACKGROUND_LABELS, device=labels.device))


def face_features_image(face_rgb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """White where ``labels`` is background, the grey face elsewhere; (N, 3, H, W) in [0, 1]."""
    return torch.where(background_mask(labels), torch.ones_like(face_rgb), to_gray(face_rgb))


def clip_input(features: torch.Tensor) -> torch.Tensor:
    """Bicubic resize to 336 and OpenAI-CLIP normalisation, the input EVA-CLIP expects.

    ``antialias=True`` is what torchvision's ``resize`` does on tensors since 0.17.
    """
    x = F.interpolate(
        features, size=(CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE), mode="bicubic", align_corners=False, antialias=True
    )
    mean = torch.tensor(EVA_CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(EVA_CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def tensor_to_rgb8(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] to an (H, W, 3) uint8 image, rounding like basicsr's tensor2img."""
    return (x[0].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)


def check_plain_weights(path: Path) -> None:
    """Read a ``.pth`` with ``weights_only=True`` before facexlib reads it its own way.

    facexlib calls ``torch.load`` without ``weights_only``, which PyTorch 2.6 and newer (what
    requirements.txt asks for) default to True, so its own read runs no code either. Reading each
    file here first gives a file that carries code, or is not weights at all, a message naming it
    and what is wrong, where facexlib's read would fail with torch's own words.
    """
    import pickle

    from flux.checkpoint import CheckpointError, other_format

    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unreadable as plain weights, whatever the reason
        kind = other_format(path)
        if isinstance(err, pickle.UnpicklingError):  # a pickle that is more than tensors
            why = "it holds objects other than tensors (code in it is never run)"
        elif kind and not kind.startswith("a PyTorch"):
            why = f"it is {kind}"
        else:
            why = "it may be truncated or corrupt"
        raise CheckpointError(
            f"{path} could not be read as plain facexlib weights: {why}. Delete it and download it again."
        ) from err


@dataclass(frozen=True)
class Alignment:
    """The landmarks used to align one face and the 512x512 aligned crop (BGR)."""

    landmarks: np.ndarray  # (5, 2) float32, image coordinates
    aligned_bgr: np.ndarray  # (512, 512, 3) uint8
    source: str  # "facexlib" (RetinaFace landmarks) or "insightface" (SCRFD keypoints, fallback)
    box: np.ndarray | None = None  # RetinaFace box (x1, y1, x2, y2) when source is facexlib
    iou: float = 0.0  # overlap of that box with the insightface box


@dataclass(frozen=True)
class Parsing:
    """BiSeNet labels of an aligned face and the grey-on-white image made from them."""

    labels: np.ndarray  # (512, 512) uint8 BiSeNet classes
    features: torch.Tensor  # (1, 3, 512, 512) float32 in [0, 1]
    clip_input: torch.Tensor  # (1, 3, 336, 336) float32, CLIP-normalised


class FaceAligner:
    """facexlib's FaceRestoreHelper (RetinaFace-ResNet50) and BiSeNet parser, loaded offline.

    ``model_root`` must hold ``detection_Resnet50_Final.pth``, ``parsing_parsenet.pth`` (which
    FaceRestoreHelper loads even though it is not used) and ``parsing_bisenet.pth``; facexlib only
    downloads files that are missing there, so it never does.
    """

    def __init__(self, model_root: str | Path, device: str | torch.device = "cpu") -> None:
        from facexlib.parsing import init_parsing_model
        from facexlib.utils.face_restoration_helper import FaceRestoreHelper

        self.device = torch.device(device)
        for name in FACEXLIB_FILES:
            check_plain_weights(Path(model_root) / name)
        root = str(model_root)
        try:
            # facexlib builds its ResNet-50 with torchvision's old `pretrained=`
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore", message=r".*(pretrained|weight enum).*", category=UserWarning
                )
                self.helper = FaceRestoreHelper(
                    upscale_factor=1,
                    face_size=FACE_SIZE,
                    crop_ratio=(1, 1),
                    det_model="retinaface_resnet50",
                    save_ext="png",
                    device=self.device,
                    model_rootpath=root,
                )
            self.helper.face_parse = init_parsing_model(
                model_name="bisenet", device=self.device, model_rootpath=root
            )
        except Exception as err:  # noqa: BLE001 - facexlib surfaces torch.load's and its own errors
            from flux.checkpoint import CheckpointError

            raise CheckpointError(
                f"The facexlib models in {model_root} could not be built ({type(err).__name__}: "
                f"{str(err)[:300]}): check that {', '.join(FACEXLIB_FILES)} are facexlib's released files."
            ) from err

    def detect(self, image_bgr: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """RetinaFace boxes (x1, y1, x2, y2, score) and (5, 2) landmarks, as FaceRestoreHelper finds them."""
        helper = self.helper
        helper.clean_all()
        helper.read_image(image_bgr)
        helper.get_face_landmarks_5(only_center_face=False)
        found = [
            (np.asarray(box, np.float32), np.asarray(lm, np.float32))
            for box, lm in zip(helper.det_faces, helper.all_landmarks_5, strict=True)
        ]
        helper.clean_all()
        return found

    def align_to(
        self, image_bgr: np.ndarray, target_box: Sequence[float], target_kps: np.ndarray
    ) -> Alignment:
        """Align the face in ``target_box`` (insightface's choice) with facexlib's landmarks.

        Rule: RetinaFace runs on a square around the target box (``CROP_CONTEXT`` box sizes wide,
        resized to ``CROP_SIZE`` pixels, black outside the image), which shows it that face at a
        size it detects well; of its detections, the one whose box has the highest IoU with the
        target box is the same face, provided that IoU is at least ``MIN_IOU``. Its five landmarks
        drive FaceRestoreHelper's usual warp of the *full* image to the 512 FFHQ template. If no
        detection qualifies, insightface's own five keypoints (same order) drive the same warp.
        """
        x1, y1, x2, y2 = (float(v) for v in target_box[:4])
        side = CROP_CONTEXT * max(x2 - x1, y2 - y1, 1.0)
        scale = CROP_SIZE / side
        ox, oy = (x1 + x2) / 2 - side / 2, (y1 + y2) / 2 - side / 2
        affine = np.array([[scale, 0.0, -ox * scale], [0.0, scale, -oy * scale]], dtype=np.float64)
        crop = cv2.warpAffine(
            image_bgr, affine, (CROP_SIZE, CROP_SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
        )
        best: tuple[float, np.ndarray, np.ndarray] | None = None
        for box, landmarks in self.detect(crop):
            box_img = np.array(
                [box[0] / scale + ox, box[1] / scale + oy, box[2] / scale + ox, box[3] / scale + oy]
            )
            iou = box_iou(box_img, (x1, y1, x2, y2))
            if best is None or iou > best[0]:
                best = (iou, box_img.astype(np.float32), landmarks / scale + np.array([ox, oy], np.float32))
        if best is not None and best[0] >= MIN_IOU:
            iou, box_img, landmarks = best
            return Alignment(
                landmarks.astype(np.float32), self.warp(image_bgr, landmarks), "facexlib", box_img, iou
            )
        logger.warning(
            "facexlib found no face matching insightface's (best IoU %.2f < %.2f); "
            "aligning on insightface's keypoints instead",
            0.0 if best is None else best[0],
            MIN_IOU,
        )
        kps = np.asarray(target_kps, np.float32)
        return Alignment(kps, self.warp(image_bgr, kps), "insightface")

    def warp(self, image_bgr: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """FaceRestoreHelper.align_warp_face of ``image_bgr`` with these landmarks: (512, 512, 3) BGR."""
        helper = self.helper
        helper.clean_all()
        helper.read_image(image_bgr)
        helper.all_landmarks_5 = [np.asarray(landmarks, np.float32)]
        helper.align_warp_face()
        aligned = helper.cropped_faces[0]
        helper.clean_all()
        return aligned

    @torch.no_grad()
    def parse(self, aligned_bgr: np.ndarray) -> Parsing:
        """BiSeNet parsing of the aligned face, then the grey face on white and its CLIP input."""
        rgb = np.ascontiguousarray(aligned_bgr[:, :, ::-1])
        face = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).float().div(255.0).to(self.device)
        mean = torch.tensor(PARSING_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(PARSING_STD, device=self.device).view(1, 3, 1, 1)
        logits = self.helper.face_parse((face - mean) / std)[0]
        labels = logits.argmax(dim=1, keepdim=True)
        features = face_features_image(face, labels)
        return Parsing(
            labels=labels[0, 0].to(torch.uint8).cpu().numpy(),
            features=features,
            clip_input=clip_input(features),
        )
