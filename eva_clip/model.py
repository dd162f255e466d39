"""EVA02-CLIP-L-14-336 vision tower as PuLID uses it, built on timm and loaded strictly.

PuLID feeds the face crop through the EVA-CLIP vision tower and keeps two things: the pooled
768-d embedding (final LayerNorm -> CLS token -> head) and the inputs of blocks 4, 8, 12, 16 and
20 (before the final norm). timm's ``eva02_large_patch14_clip_336`` computes the same function as
the official EVA-CLIP code, so the tower is timm's model with a forward that returns exactly those
tensors. The original checkpoint (full CLIP, keys ``visual.*``, ``text.*``, ``logit_scale``) is
converted with ``timm.models.eva.checkpoint_filter_fn`` and loaded with every key accounted for:
the official loader uses ``strict=False`` and would silently keep random weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from flux.checkpoint import CheckpointError, check_keys_and_shapes, expected_shapes, load_state_dict_strict

TIMM_VARIANT = "eva02_large_patch14_clip_336"

# OpenAI CLIP normalisation: the EVA-CLIP pretrained config sets none, so these are the fallback
# that PuLID ends up using.
EVA_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
EVA_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

NUM_HIDDEN_STATES = 5

# Original EVA-CLIP name fragment -> timm name fragment, as checkpoint_filter_fn renames them.
# Only used to name keys in both layouts in error messages.
_TIMM_TO_ORIGINAL = (
    ("mlp.norm", "mlp.ffn_ln"),
    ("attn.norm", "attn.inner_attn_ln"),
    ("mlp.fc1_g", "mlp.w1"),
    ("mlp.fc1_x", "mlp.w2"),
    ("mlp.fc2", "mlp.w3"),
    ("attn.q_proj.bias", "attn.q_bias"),
    ("attn.v_proj.bias", "attn.v_bias"),
)


def default_hidden_state_indices(depth: int) -> tuple[int, ...]:
    """Block indices whose INPUTS PuLID takes: ``k * max(1, depth // 6)`` for k = 1..5.

    For the full 24-block tower this is (4, 8, 12, 16, 20), PuLID's ``0 < i <= 20 and i % 4 == 0``.
    Tiny test towers keep five evenly spaced states; an index equal to ``depth`` means the output
    of the last block (still before the final norm). Depths below 5 cannot give five states.
    """
    if depth < NUM_HIDDEN_STATES:
        raise ValueError(f"EVA tower depth {depth} < {NUM_HIDDEN_STATES}: cannot provide 5 hidden states")
    step = max(1, depth // 6)
    return tuple(step * k for k in range(1, NUM_HIDDEN_STATES + 1))


class EvaVisionTower(nn.Module):
    """EVA02-CLIP vision tower returning PuLID's pooled embedding and five hidden states.

    Keyword arguments override timm's ``eva02_large_patch14_clip_336`` config (``img_size``,
    ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``num_classes`` = pooled width, ...) so
    tests can build tiny towers; the defaults are the real model. ``device="meta"`` builds it
    without allocating weights (the loader fills them).
    """

    #: The repeated transformer blocks (see :mod:`flux.repeated`).
    block_lists = ("trunk.blocks",)

    def __init__(
        self,
        *,
        hidden_state_indices: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        **timm_overrides,
    ) -> None:
        super().__init__()
        import timm

        args = {"num_classes": 768, "global_pool": "token", **timm_overrides}
        self.trunk = timm.create_model(TIMM_VARIANT, pretrained=False, device=device, **args)
        if not isinstance(self.trunk.fc_norm, nn.Identity) or self.trunk.global_pool != "token":
            raise ValueError("EVA-CLIP pools the CLS token after the final norm: use global_pool='token'")
        depth = len(self.trunk.blocks)
        indices = tuple(hidden_state_indices or default_hidden_state_indices(depth))
        if any(not 0 <= i <= depth for i in indices):
            raise ValueError(f"hidden_state_indices {indices} must lie in [0, {depth}]")
        self.hidden_state_indices = indices
        self.image_size: int = self.trunk.patch_embed.img_size[0]
        self.image_mean = EVA_CLIP_MEAN
        self.image_std = EVA_CLIP_STD

    @property
    def embed_dim(self) -> int:
        return self.trunk.embed_dim

    def forward(self, pixels: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(B, 3, H, W) normalised pixels -> (pooled (B, num_classes), [block inputs (B, N+1, D)]).

        timm's own forward runs the tower; hooks on the blocks, held for this call only, keep the
        inputs PuLID takes (an index equal to the depth: the last block's output)."""
        blocks, taken = self.trunk.blocks, {}

        def keep_input(index: int):
            return lambda block, args: taken.__setitem__(index, args[0])

        wanted = set(self.hidden_state_indices)
        hooks = [blocks[i].register_forward_pre_hook(keep_input(i)) for i in wanted if i < len(blocks)]
        if len(blocks) in wanted:
            hooks.append(
                blocks[-1].register_forward_hook(lambda block, args, out: taken.__setitem__(len(blocks), out))
            )
        try:
            features = self.trunk.forward_features(pixels)  # ends with the final norm
        finally:
            for hook in hooks:
                hook.remove()
        pooled = self.trunk.forward_head(features)
        return pooled, [taken[i] for i in self.hidden_state_indices]

    def load_original_state_dict(
        self,
        state_dict: Mapping[str, Tensor],
        source: str,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Convert an original EVA-CLIP state dict and load it strictly into ``self.trunk``."""
        converted = convert_original_state_dict(state_dict, self.trunk, source)
        load_state_dict_strict(
            self.trunk,
            converted,
            source,
            device=device,
            dtype=dtype,
            hint=_naming_hint(self.trunk, converted),
        )
        target = torch.device(device) if device is not None else _first_param_device(self.trunk)
        _materialise_non_persistent_buffers(self.trunk, target)
        if device is not None:
            self.trunk.to(device)  # a tower built off the meta device keeps its own placement otherwise


def original_key_name(timm_key: str, prefix: str = "visual.") -> str:
    """The name a timm key has in the original EVA-CLIP checkpoint (for error messages)."""
    for timm_part, original_part in _TIMM_TO_ORIGINAL:
        timm_key = timm_key.replace(timm_part, original_part)
    return prefix + timm_key


def _naming_hint(trunk: nn.Module, converted: Mapping[str, Tensor]) -> str:
    expected = expected_shapes(trunk)
    missing = sorted(expected.keys() - converted.keys())
    unexpected = sorted(converted.keys() - expected.keys())
    lines = ["Keys above use timm's names; the original EVA-CLIP file names them:"]
    lines += [f"  missing {k} = {original_key_name(k)}" for k in missing[:12]]
    lines += [f"  unexpected {k} = {original_key_name(k)}" for k in unexpected[:12]]
    return "\n".join(lines) if len(lines) > 1 else ""


def _unwrap(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    for wrapper in ("state_dict", "model", "module"):
        inner = state_dict.get(wrapper)
        if isinstance(inner, Mapping):
            state_dict = inner
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def convert_original_state_dict(
    state_dict: Mapping[str, Tensor], trunk: nn.Module, source: str
) -> dict[str, Tensor]:
    """Original EVA-CLIP keys -> timm keys via ``checkpoint_filter_fn``, refusing silent resampling.

    The filter strips ``visual.``, drops ``text.*``, ``logit_scale`` and the rope buffers (they are
    recomputed), and renames the q/v biases, sub-LNs and SwiGLU weights. It would also resample a
    pos_embed or patch kernel of another size; a checkpoint for another resolution is an error here.
    """
    from timm.models.eva import checkpoint_filter_fn

    flat = _unwrap(state_dict)
    prefix = "visual." if "visual.pos_embed" in flat else ""
    if prefix + "pos_embed" not in flat:
        raise CheckpointError(
            f"Checkpoint {source} has no 'visual.pos_embed' (or 'pos_embed'): it is not an EVA-CLIP "
            f"vision checkpoint. First keys: {', '.join(sorted(flat)[:8])}"
        )
    model_shapes = expected_shapes(trunk)
    for key in ("pos_embed", "patch_embed.proj.weight"):
        found = flat.get(prefix + key)
        if found is not None and tuple(found.shape) != model_shapes[key]:
            check_keys_and_shapes(
                {key: model_shapes[key]},
                {key: tuple(found.shape)},
                source,
                "The checkpoint is for another image or patch size.",
            )
    return checkpoint_filter_fn(flat, trunk)


def _first_param_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _materialise_non_persistent_buffers(module: nn.Module, device: torch.device) -> None:
    """Recompute buffers the checkpoint never holds (rope tables) when built on the meta device."""
    for sub in module.modules():
        if any(b.is_meta for b in sub.buffers(recurse=False)):
            init = getattr(sub, "init_non_persistent_buffers", None)
            if init is None:
                raise RuntimeError(f"{type(sub).__name__} has meta buffers and no way to recompute them")
            sub.to_empty(device=device, recurse=False)
            init()


def load_eva_clip(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.bfloat16,
    **tower_kwargs,
) -> EvaVisionTower:
    """Build the tower on the meta device and fill it from the original EVA-CLIP ``.pt`` file.

    The file is memory-mapped and read with ``weights_only=True`` (no code is unpickled); only the
    visual tower is kept. The rope tables are recomputed on ``device`` and then cast to ``dtype``,
    as the official ``model.to(torch.bfloat16)`` casts its rope buffers: in bf16 that changes the
    pooled embedding by about 2%, so keeping them in float32 would not reproduce the official ID
    tokens. Returns the tower in eval mode.
    """
    path = Path(path)
    state_dict = _read_torch_checkpoint(path)
    tower = EvaVisionTower(device="meta", **tower_kwargs)
    tower.load_original_state_dict(state_dict, str(path), device=device, dtype=dtype)
    if dtype is not None and getattr(tower.trunk, "rope", None) is not None:
        tower.trunk.rope.to(dtype)
    tower.eval().requires_grad_(False)
    return tower


def _read_torch_checkpoint(path: Path) -> Mapping[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    try:
        try:
            return torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            # Files written in torch's legacy (non-zip) format cannot be memory-mapped.
            return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # any unpickling failure means an unusable file
        raise CheckpointError(
            f"Checkpoint {path} could not be read as a torch state dict ({type(err).__name__}: {err}). "
            "It may be truncated or corrupt: delete it and download it again."
        ) from err
