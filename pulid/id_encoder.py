"""Photos of a face -> 32 ID tokens: face analysis, EVA-CLIP features, then the IDFormer.

The steps follow the official PuLID-FLUX ``get_id_embedding``: the 512-d ArcFace embedding joined
to the L2-normalised 768-d EVA-CLIP pooled embedding (1280-d), plus EVA's five hidden states,
go through the IDFormer. What is added here:

- several photos of one person give one identity: each photo is encoded on its own and the ID
  tokens are averaged (the mean keeps the tokens' scale, unlike a sum, and weights photos equally);
- the tokens of a photo already seen are cached (keyed by the pixels' hash), so re-running a
  prompt with the same face skips face analysis and EVA;
- the unconditional ID for true CFG (zeros through the IDFormer) is computed once.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn


class FaceFeatures(Protocol):
    """What face analysis gives for one photo (see :mod:`pulid.face_analysis`)."""

    arcface_embedding: np.ndarray  # (512,)
    clip_input: Tensor  # (1, 3, 336, 336), CLIP-normalised
    debug_images: list[np.ndarray]


class FaceAnalyzing(Protocol):
    """Anything with ``analyze``, ``identity`` and ``face_box`` (:class:`pulid.face_analysis.FaceAnalyzer`,
    or a test stand-in)."""

    def analyze(self, image_rgb: np.ndarray) -> FaceFeatures: ...

    def identity(self, image_rgb: np.ndarray) -> np.ndarray | None: ...

    def face_box(self, image_rgb: np.ndarray) -> tuple[float, float, float, float] | None: ...


@dataclass
class IDEmbedding:
    """ID tokens for the positive pass and, with true CFG, the unconditional ones."""

    tokens: Tensor
    uncond_tokens: Tensor | None = None
    debug_images: list[np.ndarray] = field(default_factory=list)
    arcface: list[np.ndarray] = field(default_factory=list)  # each photo's ArcFace embedding


def image_key(image: np.ndarray) -> str:
    """A photo's cache key: its pixels, shape and dtype, hashed."""
    digest = hashlib.sha256(np.ascontiguousarray(image).tobytes())
    digest.update(repr((image.shape, image.dtype.str)).encode())
    return digest.hexdigest()


class IDEncoder:
    """Owns face analysis, the EVA tower and the IDFormer, and turns photos into ID tokens."""

    def __init__(
        self,
        face_analyzer: FaceAnalyzing,
        eva: nn.Module,
        id_former: nn.Module,
        device: torch.device | str,
        dtype: torch.dtype,
        cache_size: int = 32,
    ):
        self.face_analyzer = face_analyzer
        self.eva = eva
        self.id_former = id_former
        self.device = torch.device(device)
        self.dtype = dtype
        self.cache_size = cache_size
        self._cache: OrderedDict[str, _Encoded] = OrderedDict()
        # The unconditional ID of true CFG; made from the first photo's feature shapes.
        self._uncond: Tensor | None = None

    @torch.inference_mode()
    def features(self, image_rgb: np.ndarray) -> tuple[Tensor, list[Tensor], FaceFeatures]:
        """The IDFormer inputs for one photo: the 1280-d condition and EVA's hidden states, and
        the face analysis they came from."""
        face = self.face_analyzer.analyze(image_rgb)
        arcface = torch.as_tensor(np.asarray(face.arcface_embedding), dtype=self.dtype, device=self.device)
        pooled, hidden = self.eva(face.clip_input.to(self.device, self.dtype))
        pooled = pooled / torch.norm(pooled, 2, 1, True)
        cond = torch.cat([arcface.reshape(1, -1), pooled], dim=-1)
        if self._uncond is None:  # zeros through the IDFormer, as the official pipeline does
            self._uncond = self.id_former(torch.zeros_like(cond), [torch.zeros_like(h) for h in hidden])
        return cond, hidden, face

    @torch.inference_mode()
    def encode_one(self, image_rgb: np.ndarray) -> _Encoded:
        """One photo's ID features (conditional, and the EVA-CLIP hidden states), cached by its pixels."""
        key = image_key(image_rgb)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        cond, hidden, face = self.features(image_rgb)
        result = _Encoded(
            self.id_former(cond, hidden),
            list(face.debug_images),
            np.asarray(face.arcface_embedding, np.float32).reshape(-1),
        )
        self._cache[key] = result
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return result

    def forget(self) -> None:
        """Drop the cached embeddings of the photos seen so far, so that the next photo is analysed
        and encoded afresh (a benchmark times a fresh photo). The unconditional ID is kept: it does
        not depend on any photo."""
        self._cache.clear()

    @torch.inference_mode()
    def __call__(self, images: list[np.ndarray], with_uncond: bool = False) -> IDEmbedding:
        if not images:
            raise ValueError("at least one ID image is needed")
        encoded = [self.encode_one(image) for image in images]
        tokens = (
            torch.stack([e.tokens for e in encoded]).mean(dim=0) if len(encoded) > 1 else encoded[0].tokens
        )
        return IDEmbedding(
            tokens=tokens,
            uncond_tokens=self._uncond if with_uncond else None,
            debug_images=[image for e in encoded for image in e.debug_images],
            arcface=[e.arcface for e in encoded],
        )

    def identity(self, image_rgb: np.ndarray) -> np.ndarray | None:
        """The ArcFace embedding of the largest face in an image (a generated one), or None."""
        return self.face_analyzer.identity(image_rgb)

    def face_box(self, image_rgb: np.ndarray) -> tuple[float, float, float, float] | None:
        """The box of the largest face in an image (x1, y1, x2, y2), or None."""
        return self.face_analyzer.face_box(image_rgb)


@dataclass(frozen=True)
class _Encoded:
    """One photo's ID tokens, the images the UI's debug gallery shows, and its ArcFace embedding."""

    tokens: Tensor
    debug_images: list[np.ndarray]
    arcface: np.ndarray
