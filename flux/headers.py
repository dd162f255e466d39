"""What a weight file's header is, the error for a file that does not fit, and what its keys say.

The lowest layer of checkpoint loading: :mod:`flux.checkpoint` (the one loading loop), the file
readers (:mod:`flux.gguf_file`) and the formats (:mod:`flux.quant`) all build on it.
"""

from __future__ import annotations

from collections.abc import Mapping

from flux.errors import UserError

# A file's header: key -> (shape, dtype code), the code a safetensors dtype ("BF16", "F8_E4M3") or a
# GGUF type ("F16", "Q4_K").
Header = Mapping[str, tuple[tuple[int, ...], str]]


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing keys, has unexpected keys, shapes or dtypes, or cannot be read."""


def layout_hint(keys: set[str]) -> str:
    """Recognise common wrong files by their keys, to tell the user what they gave us."""
    if any(k.endswith("._data") or k.endswith("._scale") for k in keys):
        return "This looks like a quanto fp8 checkpoint: load it with --fp8 --fp8_mode quanto."
    if any(k.startswith("transformer_blocks.") or k.startswith("single_transformer_blocks.") for k in keys):
        return (
            "This looks like a diffusers-format transformer: use the original single-file "
            "checkpoint (e.g. flux1-dev.safetensors) instead."
        )
    if any(k.startswith(("first_stage_model.", "cond_stage_model.", "text_encoders.")) for k in keys):
        return (
            "This looks like an all-in-one checkpoint (transformer, autoencoder and text encoders in "
            "one file): use the transformer-only file."
        )
    if any(k.startswith(("input_blocks.", "output_blocks.", "middle_block.")) for k in keys):
        return "This looks like a Stable Diffusion UNet (SD 1.5 / SDXL), not a FLUX transformer."
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "This looks like a ComfyUI/SD-style checkpoint with a 'model.diffusion_model.' prefix."
    if any(k.startswith("pulid_") for k in keys):
        return "This is a PuLID weight file, not a FLUX checkpoint."
    has_dit = any(k.startswith("double_blocks.") for k in keys)
    if any(k.startswith(("encoder.", "decoder.")) for k in keys) and not has_dit:
        return "This looks like an autoencoder checkpoint (ae.safetensors)."
    whole = any(k.startswith("time_in.") for k in keys) and any(k.startswith("final_layer.") for k in keys)
    if has_dit and whole and not any(k.startswith("guidance_in.") for k in keys):
        # only a whole transformer: a partial one (a cut-off file) lacks far more than guidance
        return "This transformer has no guidance embedding: it looks like FLUX.1-schnell (not supported)."
    if has_dit:
        return "This looks like a FLUX transformer (flux1-dev.safetensors)."
    return ""
