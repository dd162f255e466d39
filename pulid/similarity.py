"""How close a generated face is to the reference: the ArcFace cosine similarity.

The score is the cosine between the ArcFace (antelopev2 glintr100) embedding of the largest face
in the generated image and that of each reference photo, averaged over the photos. It uses the
same recogniser PuLID is conditioned on, so it shows whether the identity took in that model's
eyes: a guide for tuning the ID weight and start step, not an independent measure of likeness.
ArcFace cosines of two photos of one person are typically above about 0.4-0.5, of two strangers
near 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NO_ID_PHOTO = "no ID photo"
NO_FACE_FOUND = "no face found"


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors, computed in float64."""
    a = np.asarray(a, np.float64).reshape(-1)
    b = np.asarray(b, np.float64).reshape(-1)
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    if not np.isfinite(norms) or norms == 0:
        raise ValueError("cannot compare a zero or non-finite embedding")
    return float(a @ b / norms)


def identity_similarity(references: Sequence[np.ndarray], found: np.ndarray | None) -> float | None:
    """The mean cosine between the generated face's embedding and each reference's; None when the
    image holds no face."""
    if found is None:
        return None
    if not references:
        raise ValueError("no reference embeddings to compare with")
    return float(np.mean([cosine(reference, found) for reference in references]))


SCALE = (
    "Face similarity is the cosine between the ArcFace embeddings of the face in the image and of "
    "the photo: two pictures of one person typically score above about 0.4, and another person's "
    "face under 0.2. It tells whether the identity took, not how good the image is."
)


def rounded(score: float | None) -> float | None:
    """The score as the front doors give it (two decimals: the third means nothing)."""
    return None if score is None else round(score, 2)


def describe(score: float | None, has_reference: bool) -> str:
    """The score as people read it: ``0.72``, ``no face found`` or ``no ID photo``."""
    if not has_reference:
        return NO_ID_PHOTO
    return NO_FACE_FOUND if score is None else f"{score:.2f}"
