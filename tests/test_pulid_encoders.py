"""IDFormer and PerceiverAttentionCA: key layout of the released file, and the math in float64.

The reference functions below re-implement the official ``pulid/encoders_flux.py`` forward passes
with plain tensor ops, reading weights by key from the module's state dict.
"""

import math

import pytest
import torch
from safetensors.torch import save_file

from flux.checkpoint import CheckpointError
from pulid.encoders import IDFormer, PerceiverAttentionCA, PuLIDWeights, load_pulid_weights, num_pulid_ca
from tests.manifests import read_manifest
from tests.numerics import rel_err

MANIFEST = "pulid_flux_v0.9.x.manifest.json"

TINY_IDFORMER = dict(
    dim=16,
    depth=10,
    dim_head=4,
    heads=2,
    num_id_token=3,
    num_queries=4,
    output_dim=12,
    ff_mult=2,
    id_dim=20,
    vit_dim=24,
    mapping_dim=8,
)
TINY_CA = dict(dim=24, dim_head=4, heads=3, kv_dim=12)
LN_EPS = 1e-5  # nn.LayerNorm default, used by the official modules
LEAKY_SLOPE = 0.01  # nn.LeakyReLU default

TOL_F64 = 1e-6  # float64 module vs float64 reference; the softmax runs in float32, as officially
TOL_F32 = 1e-5  # float32 module vs float64 reference


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial weights everywhere (LayerNorms away from 1/0) so every term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(p.shape[-1], 1) ** 0.5)
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return module


# ---------------------------------------------------------------- independent float64 reference


def layer_norm(x, sd, p):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + LN_EPS) * sd[p + "weight"] + sd[p + "bias"]


def linear(x, sd, p):
    out = x @ sd[p + "weight"].T
    return out + sd[p + "bias"] if p + "bias" in sd else out


def attention(queries, context, sd, p, heads):
    q = queries @ sd[p + "to_q.weight"].T
    kv = context @ sd[p + "to_kv.weight"].T
    inner = q.shape[-1]
    k, v = kv[..., :inner], kv[..., inner:]
    dh = inner // heads
    q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, dh) for t in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(q.shape[0], q.shape[1], inner)
    return out @ sd[p + "to_out.weight"].T


def reference_ca(sd, id_tokens, image_tokens, heads):
    """Image tokens (norm2) are the queries; ID tokens (norm1) the keys and values."""
    queries = layer_norm(image_tokens, sd, "norm2.")
    return attention(queries, layer_norm(id_tokens, sd, "norm1."), sd, "", heads)


def reference_mapping(x, sd, p):
    leaky = lambda t: torch.where(t >= 0, t, LEAKY_SLOPE * t)
    x = leaky(layer_norm(linear(x, sd, p + "0."), sd, p + "1."))
    x = leaky(layer_norm(linear(x, sd, p + "3."), sd, p + "4."))
    return linear(x, sd, p + "6.")


def reference_idformer(sd, id_cond, hidden, cfg):
    b = id_cond.shape[0]
    dim, n_id, heads = cfg["dim"], cfg["num_id_token"], cfg["heads"]
    per_feature = cfg["depth"] // 5
    x = reference_mapping(id_cond, sd, "id_embedding_mapping.").reshape(b, -1, dim)
    assert x.shape[1] % n_id == 0
    latents = torch.cat([sd["latents"].expand(b, -1, -1), x], dim=1)
    for i in range(5):
        context = torch.cat([x, reference_mapping(hidden[i], sd, f"mapping_{i}.")], dim=1)
        for j in range(i * per_feature, (i + 1) * per_feature):
            p = f"layers.{j}.0."
            normed = layer_norm(latents, sd, p + "norm2.")
            kv_in = torch.cat([layer_norm(context, sd, p + "norm1."), normed], dim=1)
            latents = latents + attention(normed, kv_in, sd, p, heads)
            f = f"layers.{j}.1."
            y = linear(layer_norm(latents, sd, f + "0."), sd, f + "1.")
            y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
            latents = latents + linear(y, sd, f + "3.")
    return latents[:, : cfg["num_queries"]] @ sd["proj_out"]


# ---------------------------------------------------------------- tests


def test_full_size_container_matches_manifest():
    manifest = read_manifest(MANIFEST)
    with torch.device("meta"):
        weights = PuLIDWeights()
    weights = weights.to(torch.bfloat16)
    got = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in weights.state_dict().items()]
    want = [(k, v["shape"], v["dtype"]) for k, v in manifest["tensors"].items()]
    assert got == want  # names, order, shapes and dtypes
    assert len(weights.pulid_ca) == manifest["num_pulid_ca"] == 20
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(weights.pulid_encoder) == manifest["num_params_pulid_encoder"]
    assert count(weights.pulid_ca) == manifest["num_params_pulid_ca"]


def test_official_defaults():
    with torch.device("meta"):
        encoder, ca = IDFormer(), PerceiverAttentionCA()
    assert (encoder.dim, encoder.num_queries, encoder.num_id_token) == (1024, 32, 5)
    assert encoder.layers_per_feature == 2
    assert encoder.proj_out.shape == (1024, 2048) and len(encoder.layers) == 10
    assert (encoder.layers[0][0].heads, encoder.layers[0][0].dim_head) == (16, 64)
    assert (ca.heads, ca.dim_head) == (16, 128)
    assert (ca.to_q.in_features, ca.to_kv.in_features, ca.to_out.out_features) == (3072, 2048, 3072)


def test_num_ca_from_dit_depths():
    assert num_pulid_ca(19, 38) == 20  # FLUX.1-dev: after double 0,2,..,18 and single 0,4,..,36
    assert num_pulid_ca(2, 3) == 2
    assert num_pulid_ca(3, 5) == 4
    assert num_pulid_ca(4, 8, double_interval=1, single_interval=8) == 5


@pytest.mark.parametrize("dtype,tol", [(torch.float64, TOL_F64), (torch.float32, TOL_F32)])
def test_cross_attention_matches_reference(dtype, tol):
    seed = int(torch.randint(0, 10_000, ()))
    ca = randomize(PerceiverAttentionCA(**TINY_CA), seed).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    id_tokens = torch.randn(2, 5, TINY_CA["kv_dim"], generator=g, dtype=torch.float64)
    image_tokens = torch.randn(2, 9, TINY_CA["dim"], generator=g, dtype=torch.float64)
    with torch.no_grad():
        out = ca(id_tokens.to(dtype), image_tokens.to(dtype))
    sd = {k: v.double() for k, v in ca.state_dict().items()}
    ref = reference_ca(sd, id_tokens, image_tokens, TINY_CA["heads"])
    assert out.shape == (2, 9, TINY_CA["dim"]) and out.dtype == dtype
    assert rel_err(out, ref) < tol
    # Image tokens are queries: each one's output is independent of the others.
    with torch.no_grad():
        assert rel_err(ca(id_tokens.to(dtype), image_tokens[:, :4].to(dtype)), ref[:, :4]) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float64, TOL_F64), (torch.float32, TOL_F32)])
def test_idformer_matches_reference(dtype, tol):
    seed = int(torch.randint(0, 10_000, ()))
    cfg = TINY_IDFORMER
    model = randomize(IDFormer(**cfg), seed).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    id_cond = torch.randn(3, cfg["id_dim"], generator=g, dtype=torch.float64)
    hidden = [torch.randn(3, 7, cfg["vit_dim"], generator=g, dtype=torch.float64) for _ in range(5)]
    with torch.no_grad():
        out = model(id_cond.to(dtype), [h.to(dtype) for h in hidden])
    ref = reference_idformer({k: v.double() for k, v in model.state_dict().items()}, id_cond, hidden, cfg)
    assert out.shape == (3, cfg["num_queries"], cfg["output_dim"]) and out.dtype == dtype
    assert rel_err(out, ref) < tol
    # Each hidden state feeds its own layer group: the order of the five states matters.
    with torch.no_grad():
        swapped = model(id_cond.to(dtype), [h.to(dtype) for h in [hidden[1], hidden[0], *hidden[2:]]])
    assert rel_err(swapped, ref) > 1e-3


def test_idformer_several_reference_images():
    cfg = TINY_IDFORMER
    model = randomize(IDFormer(**cfg), 7).double()
    g = torch.Generator().manual_seed(8)
    id_cond = torch.randn(2, 3, cfg["id_dim"], generator=g, dtype=torch.float64)  # 3 images per sample
    hidden = [torch.randn(2, 6, cfg["vit_dim"], generator=g, dtype=torch.float64) for _ in range(5)]
    with torch.no_grad():
        out = model(id_cond, hidden)
    ref = reference_idformer({k: v.double() for k, v in model.state_dict().items()}, id_cond, hidden, cfg)
    assert out.shape == (2, cfg["num_queries"], cfg["output_dim"])
    assert rel_err(out, ref) < TOL_F64


def test_idformer_rejects_wrong_inputs():
    with pytest.raises(ValueError, match="multiple of 5"):
        IDFormer(**{**TINY_IDFORMER, "depth": 7})
    model = IDFormer(**TINY_IDFORMER)
    with pytest.raises(ValueError, match="5 EVA hidden states"):
        model(torch.randn(1, 20), [torch.randn(1, 7, 24)] * 4)


def tiny_weights(seed: int) -> PuLIDWeights:
    return randomize(PuLIDWeights(3, encoder_kwargs=TINY_IDFORMER, ca_kwargs=TINY_CA), seed)


def test_load_pulid_weights_roundtrip(tmp_path):
    source = tiny_weights(11)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in source.state_dict().items()}
    save_file(state, tmp_path / "pulid.safetensors")
    loaded = load_pulid_weights(
        tmp_path / "pulid.safetensors",
        device="cpu",
        dtype=torch.float32,
        num_ca=3,
        encoder_kwargs=TINY_IDFORMER,
        ca_kwargs=TINY_CA,
    )
    got = loaded.state_dict()
    assert got.keys() == state.keys()
    for key, value in state.items():
        assert got[key].dtype == torch.float32 and not got[key].is_meta
        torch.testing.assert_close(got[key], value.float(), rtol=0, atol=0)
    assert not loaded.training


def test_load_pulid_weights_names_missing_and_unexpected(tmp_path):
    state = {k: v.detach().contiguous() for k, v in tiny_weights(12).state_dict().items()}
    del state["pulid_ca.2.to_kv.weight"]
    state["pulid_ca.3.to_q.weight"] = torch.zeros(8, 24)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_pulid_weights(
            tmp_path / "bad.safetensors", num_ca=3, encoder_kwargs=TINY_IDFORMER, ca_kwargs=TINY_CA
        )
    message = str(info.value)
    assert "bad.safetensors" in message
    assert "missing key(s): pulid_ca.2.to_kv.weight" in message
    assert "unexpected key(s): pulid_ca.3.to_q.weight" in message
