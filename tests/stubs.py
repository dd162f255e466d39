"""Stand-ins the pipeline tests share: a face analyser that needs no models, and random photos."""

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class StubFace:
    arcface_embedding: np.ndarray
    clip_input: torch.Tensor
    debug_images: list = field(default_factory=list)


class StubFaceAnalyzer:
    """Deterministic features from the pixels, counting calls (the real analyser has its own tests)."""

    def __init__(self):
        self.calls = 0

    def analyze(self, image):
        self.calls += 1
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        clip_input = F.interpolate(pixels, size=(336, 336), mode="bilinear", align_corners=False)
        g = torch.Generator().manual_seed(int(image.sum()) % 2**31)
        return StubFace(torch.randn(512, generator=g).numpy(), clip_input, [image[:8, :8]])

    def face_box(self, image):
        """A fixed box in the middle-upper part of a photo; a flat image holds no face."""
        if image.std() < 1:
            return None
        h, w = image.shape[:2]
        return (0.4 * w, 0.3 * h, 0.6 * w, 0.6 * h)

    def identity(self, image):
        """An embedding of a generated image from its pixels; a flat image holds no face."""
        if image.std() < 1:
            return None
        g = torch.Generator().manual_seed(int(image.sum()) % 2**31)
        return torch.randn(512, generator=g).numpy()


def photo(seed):
    return np.random.default_rng(seed).integers(0, 256, (64, 48, 3), dtype=np.uint8)
