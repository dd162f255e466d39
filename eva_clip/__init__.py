"""EVA02-CLIP-L-14-336 vision tower (timm-based) that PuLID uses for face features."""

from eva_clip.model import (
    EVA_CLIP_MEAN,
    EVA_CLIP_STD,
    EvaVisionTower,
    convert_original_state_dict,
    default_hidden_state_indices,
    load_eva_clip,
    original_key_name,
)

__all__ = [
    "EVA_CLIP_MEAN",
    "EVA_CLIP_STD",
    "EvaVisionTower",
    "convert_original_state_dict",
    "default_hidden_state_indices",
    "load_eva_clip",
    "original_key_name",
]
