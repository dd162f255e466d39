"""EVA02-CLIP vision tower: key conversion against the manifest, strict loading, and the math.

The numeric test builds an original-layout EVA-CLIP checkpoint (keys ``visual.*`` with the official
names) and evaluates the official EVA-CLIP vision tower on it with plain float64 tensor ops, so the
renames done by the converter, timm's RoPE layout and the pooled/hidden-state semantics are all
checked against the formulas in the manifest notes rather than against the module itself.
"""

import math

import pytest
import torch

from eva_clip import (
    EVA_CLIP_MEAN,
    EVA_CLIP_STD,
    EvaVisionTower,
    convert_original_state_dict,
    default_hidden_state_indices,
    load_eva_clip,
)
from flux.checkpoint import CheckpointError
from flux.hub import WeightsNotFoundError
from pulid.catalogue import required_weights
from pulid.loading import locate_weights
from tests.manifests import read_manifest
from tests.numerics import rel_err

MANIFEST = "eva02_clip_l_14_336_visual.manifest.json"

TINY = dict(img_size=28, patch_size=7, embed_dim=32, depth=12, num_heads=4, num_classes=24)
TINY_HEAD_DIM = 8
ROPE_PT_SEQ_LEN = 16  # EVA-CLIP pt_hw_seq_len; timm's ref_feat_shape (16, 16)
LN_EPS = 1e-6

# float64 tower vs float64 reference. timm builds the RoPE table in float32 (as the official code
# does), which bounds the agreement at about 1e-7.
TOL_F64 = 1e-6
# float32 tower vs float64 reference.
TOL_F32 = 1e-5

# timm name fragment -> official EVA-CLIP name fragment, written here independently of the module.
TIMM_TO_OFFICIAL = {
    ".mlp.fc1_g.": ".mlp.w1.",
    ".mlp.fc1_x.": ".mlp.w2.",
    ".mlp.fc2.": ".mlp.w3.",
    ".mlp.norm.": ".mlp.ffn_ln.",
    ".attn.norm.": ".attn.inner_attn_ln.",
    ".attn.q_proj.bias": ".attn.q_bias",
    ".attn.v_proj.bias": ".attn.v_bias",
}


def official_name(timm_key: str) -> str:
    for a, b in TIMM_TO_OFFICIAL.items():
        timm_key = timm_key.replace(a, b)
    return "visual." + timm_key


def official_checkpoint(seed: int = 0, **tiny) -> dict[str, torch.Tensor]:
    """A full-CLIP-layout checkpoint for a tiny tower: visual (official names), rope, text, logit_scale."""
    cfg = {**TINY, **tiny}
    shapes = {k: tuple(v.shape) for k, v in EvaVisionTower(device="meta", **cfg).trunk.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        if len(shape) == 1:  # LayerNorm weights (the only 1-D weights) and biases, away from 1 and 0
            base = 1.0 if key.endswith("weight") else 0.0
            value = base + 0.2 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) in (2, 4) else shape[-1]
            value = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        out[official_name(key)] = value.half()  # the real file is probably fp16
    grid = cfg["img_size"] // cfg["patch_size"]
    head_dim = cfg["embed_dim"] // cfg["num_heads"]
    for name in ["visual.rope"] + [f"visual.blocks.{i}.attn.rope" for i in range(cfg["depth"])]:
        for part in ("freqs_cos", "freqs_sin"):
            out[f"{name}.{part}"] = torch.randn(grid * grid, head_dim, generator=g)
    out["text.token_embedding.weight"] = torch.randn(10, 8, generator=g)
    out["text.transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(24, 8, generator=g)
    out["text.ln_final.weight"] = torch.randn(8, generator=g)
    out["logit_scale"] = torch.tensor(4.6)
    return out


# ---------------------------------------------------------------- independent float64 reference


def layer_norm(x, w, b):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + LN_EPS) * w + b


def rope_tables(grid: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionRotaryEmbeddingFast: interpolated positions, per-axis bands repeated pairwise, (h, w) concat."""
    half = head_dim // 2
    bands = 1.0 / 10000 ** (torch.arange(0, half, 2, dtype=torch.float64) / half)
    t = torch.arange(grid, dtype=torch.float64) / grid * ROPE_PT_SEQ_LEN
    per_axis = torch.repeat_interleave(torch.outer(t, bands), 2, dim=-1)  # (grid, half)
    rows = per_axis[:, None, :].expand(grid, grid, half)
    cols = per_axis[None, :, :].expand(grid, grid, half)
    freqs = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)
    return freqs.cos(), freqs.sin()


def rotate_pairs(x):
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def reference_tower(sd, pixels, *, patch, heads, indices):
    """Official EVA02-CLIP visual forward (return_hidden) from an official-layout state dict."""
    w = {k.removeprefix("visual."): v.double() for k, v in sd.items() if k.startswith("visual.")}
    b, c, h, _ = pixels.shape
    grid = h // patch
    x = pixels.double().reshape(b, c, grid, patch, grid, patch).permute(0, 2, 4, 1, 3, 5)
    x = x.reshape(b, grid * grid, c * patch * patch)
    x = x @ w["patch_embed.proj.weight"].reshape(w["patch_embed.proj.weight"].shape[0], -1).T
    x = x + w["patch_embed.proj.bias"]
    x = torch.cat([w["cls_token"].expand(b, -1, -1), x], dim=1) + w["pos_embed"]
    dim = x.shape[-1]
    head_dim = dim // heads
    cos, sin = rope_tables(grid, head_dim)
    depth = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("blocks."))
    hidden = {}
    for i in range(depth):
        hidden[i] = x
        p = f"blocks.{i}."
        y = layer_norm(x, w[p + "norm1.weight"], w[p + "norm1.bias"])
        q = y @ w[p + "attn.q_proj.weight"].T + w[p + "attn.q_bias"]
        k = y @ w[p + "attn.k_proj.weight"].T
        v = y @ w[p + "attn.v_proj.weight"].T + w[p + "attn.v_bias"]
        q, k, v = (t.reshape(b, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        q = torch.cat([q[:, :, :1], q[:, :, 1:] * cos + rotate_pairs(q[:, :, 1:]) * sin], dim=2)
        k = torch.cat([k[:, :, :1], k[:, :, 1:] * cos + rotate_pairs(k[:, :, 1:]) * sin], dim=2)
        scores = q @ k.transpose(-1, -2) * head_dim**-0.5
        scores = torch.exp(scores - scores.amax(-1, keepdim=True))
        attn = (scores / scores.sum(-1, keepdim=True)) @ v
        attn = attn.transpose(1, 2).reshape(b, -1, dim)
        attn = layer_norm(attn, w[p + "attn.inner_attn_ln.weight"], w[p + "attn.inner_attn_ln.bias"])
        x = x + attn @ w[p + "attn.proj.weight"].T + w[p + "attn.proj.bias"]
        y = layer_norm(x, w[p + "norm2.weight"], w[p + "norm2.bias"])
        gate = y @ w[p + "mlp.w1.weight"].T + w[p + "mlp.w1.bias"]
        lin = y @ w[p + "mlp.w2.weight"].T + w[p + "mlp.w2.bias"]
        y = gate * torch.sigmoid(gate) * lin
        y = layer_norm(y, w[p + "mlp.ffn_ln.weight"], w[p + "mlp.ffn_ln.bias"])
        x = x + y @ w[p + "mlp.w3.weight"].T + w[p + "mlp.w3.bias"]
    hidden[depth] = x
    cls = layer_norm(x, w["norm.weight"], w["norm.bias"])[:, 0]
    pooled = cls @ w["head.weight"].T + w["head.bias"]
    return pooled, [hidden[i] for i in indices]


# ---------------------------------------------------------------- tests


def test_full_size_conversion_matches_manifest():
    manifest = read_manifest(MANIFEST)
    tower = EvaVisionTower(device="meta")
    original = {f"visual.{k}": torch.empty(v["shape"], device="meta") for k, v in manifest["tensors"].items()}
    original["text.positional_embedding"] = torch.empty(77, 768, device="meta")
    original["text.transformer.resblocks.11.mlp.c_proj.weight"] = torch.empty(768, 3072, device="meta")
    original["logit_scale"] = torch.empty((), device="meta")

    converted = convert_original_state_dict(original, tower.trunk, "manifest")

    model_shapes = {k: tuple(v.shape) for k, v in tower.trunk.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == model_shapes
    assert len(model_shapes) == manifest["num_keys_learned_parameters"] == 512
    assert sum(math.prod(s) for s in model_shapes.values()) == manifest["num_params"]
    kept = {official_name(k) for k in converted}
    dropped = {k for k in original if k.startswith("visual.")} - kept
    assert dropped == {f"visual.{k}" for k in manifest["rope_buffer_keys"]}
    assert kept <= set(original)


def test_full_size_tower_config():
    tower = EvaVisionTower(device="meta")
    trunk = tower.trunk
    assert tower.hidden_state_indices == (4, 8, 12, 16, 20)
    assert tower.image_size == 336 and tower.embed_dim == 1024 and len(trunk.blocks) == 24
    assert trunk.blocks[0].attn.num_heads == 16 and trunk.blocks[0].mlp.fc1_g.out_features == 2730
    assert trunk.head.out_features == 768 and trunk.norm.eps == LN_EPS
    assert (tower.image_mean, tower.image_std) == (EVA_CLIP_MEAN, EVA_CLIP_STD)


def test_hidden_state_index_rule():
    assert default_hidden_state_indices(24) == (4, 8, 12, 16, 20)
    assert default_hidden_state_indices(12) == (2, 4, 6, 8, 10)
    assert default_hidden_state_indices(5) == (1, 2, 3, 4, 5)
    with pytest.raises(ValueError, match="depth 4"):
        default_hidden_state_indices(4)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, TOL_F64), (torch.float32, TOL_F32)])
def test_loaded_tower_matches_official_math(tmp_path, dtype, tol):
    seed = int(torch.randint(0, 10_000, ()))
    ckpt = official_checkpoint(seed)
    torch.save(ckpt, tmp_path / "eva.pt")
    tower = load_eva_clip(tmp_path / "eva.pt", "cpu", dtype, **TINY)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(seed + 1))

    with torch.no_grad():
        pooled, hidden = tower(pixels.to(dtype))
    indices = default_hidden_state_indices(TINY["depth"])
    ref_pooled, ref_hidden = reference_tower(ckpt, pixels, patch=7, heads=4, indices=indices)

    assert pooled.shape == (2, TINY["num_classes"]) and pooled.dtype == dtype
    assert len(hidden) == 5 and all(h.shape == (2, 17, 32) for h in hidden)
    assert rel_err(pooled, ref_pooled) < tol
    for got, want in zip(hidden, ref_hidden, strict=True):
        assert rel_err(got, want) < tol
    # The states are block inputs, not outputs: the neighbour block's input differs clearly.
    _, shifted = reference_tower(ckpt, pixels, patch=7, heads=4, indices=[i + 1 for i in indices])
    assert rel_err(hidden[0], shifted[0]) > 1e-2


def test_loader_copies_every_tensor_and_ignores_text_and_rope(tmp_path):
    ckpt = official_checkpoint(3)
    torch.save({"state_dict": ckpt}, tmp_path / "wrapped.pt")
    tower = load_eva_clip(tmp_path / "wrapped.pt", "cpu", torch.float32, **TINY)
    state = tower.trunk.state_dict()
    assert len(state) == len([k for k in ckpt if k.startswith("visual.") and "rope" not in k])
    for key, value in state.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, ckpt[official_name(key)].float(), rtol=0, atol=0)
    assert not any(t.is_meta for t in tower.trunk.buffers())
    fresh = EvaVisionTower(**TINY).trunk.rope.pos_embed  # tables computed on the CPU at construction
    torch.testing.assert_close(tower.trunk.rope.pos_embed, fresh, rtol=0, atol=0)
    assert not tower.training and not any(p.requires_grad for p in tower.parameters())


def test_missing_key_is_named_in_both_layouts(tmp_path):
    ckpt = official_checkpoint(4)
    del ckpt["visual.blocks.3.mlp.w3.weight"]
    torch.save(ckpt, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError) as info:
        load_eva_clip(tmp_path / "missing.pt", "cpu", torch.float32, **TINY)
    message = str(info.value)
    assert "missing.pt" in message and "1 missing key" in message
    assert "blocks.3.mlp.fc2.weight" in message and "visual.blocks.3.mlp.w3.weight" in message


def test_unexpected_visual_key_is_named(tmp_path):
    ckpt = official_checkpoint(5)
    ckpt["visual.blocks.0.attn.extra_scale"] = torch.ones(32)
    torch.save(ckpt, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): blocks\.0\.attn\.extra_scale"):
        load_eva_clip(tmp_path / "extra.pt", "cpu", torch.float32, **TINY)


def test_other_resolution_is_refused_not_resampled(tmp_path):
    ckpt = official_checkpoint(6, img_size=35)  # 5x5 grid instead of 4x4
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"pos_embed: file \(1, 26, 32\) vs model \(1, 17, 32\)"):
        load_eva_clip(tmp_path / "other.pt", "cpu", torch.float32, **TINY)


def test_non_eva_file_and_unreadable_file(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an EVA-CLIP"):
        load_eva_clip(tmp_path / "other.pt", "cpu", torch.float32, **TINY)
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pt could not be read"):
        load_eva_clip(tmp_path / "broken.pt", "cpu", torch.float32, **TINY)


def test_catalogue_entry_is_found_in_the_models_folder_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    entry = required_weights()["eva"]
    weights = entry.weights
    assert weights.repo_id == "QuanSun/EVA-CLIP" and weights.filename == "EVA02_CLIP_L_336_psz14_s6B.pt"
    assert 850e6 < weights.size_bytes < 860e6
    with pytest.raises(WeightsNotFoundError, match="EVA02_CLIP_L_336_psz14_s6B.pt"):
        locate_weights({"eva": entry}, tmp_path)
    torch.save(official_checkpoint(7), tmp_path / weights.local_name)
    path = locate_weights({"eva": entry}, tmp_path)["eva"]
    tower = load_eva_clip(path, "cpu", torch.float32, **TINY)
    assert tower.trunk.cls_token.dtype == torch.float32


def test_bf16_tower_keeps_rope_tables_in_bf16_like_the_official_cast(tmp_path):
    ckpt = official_checkpoint(5)
    torch.save(ckpt, tmp_path / "eva.pt")
    bf16 = load_eva_clip(tmp_path / "eva.pt", "cpu", torch.bfloat16, **TINY)
    f32 = load_eva_clip(tmp_path / "eva.pt", "cpu", torch.float32, **TINY)
    # the sin/cos table the blocks use (timm keeps its frequency bands in float32 on purpose)
    assert bf16.trunk.rope.pos_embed.dtype == torch.bfloat16
    assert f32.trunk.rope.pos_embed.dtype == torch.float32
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        low, high = bf16(pixels.bfloat16())[0], f32(pixels)[0]
    assert 0 < rel_err(low, high) < 0.05  # bf16 throughout, as the official tower runs
