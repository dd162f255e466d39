"""fp8: the XLabs quanto checkpoint loader (strict, meta device) and the native Fp8Linear fast path.

Numeric references are independent float64 computations; tolerances are stated where they are used.
"""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flux.checkpoint import CheckpointError, check_header
from flux.loading import load_flow_model
from flux.model import Flux
from flux.quant import (
    FP8_MODULATION,
    Fp8Linear,
    NativeFp8Format,
    quantize_linears_to_fp8,
    quantize_rowwise,
    quanto_format,
    xlabs_quantization_map,
)
from flux.quant.fp8_linear import emulated_mm_rowwise
from flux.quant.quanto_compat import expected_state, quantize_as_mapped
from flux.registry import flux_dev_params
from tests.manifests import read_manifest
from tests.numerics import fresh_seed, rel_err
from tests.tiny_configs import tiny_flux_params
from tests.tiny_models import random_inputs

F64 = torch.float64


def load_quanto(path, map_path, params, device):
    """XLabs' layout through the one DiT loader, as pulid.loading does with --fp8_mode quanto."""
    return load_flow_model(path, params, device, fmt=quanto_format(map_path))


def tiny_model(seed: int) -> Flux:
    torch.manual_seed(seed)
    return Flux(tiny_flux_params()).eval()


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k].float(), b[k].float())
        for k in a
    )


# ---------------------------------------------------------------- quanto compatibility path


@pytest.fixture(scope="module")
def quanto():
    return pytest.importorskip("optimum.quanto")


def test_full_size_quanto_layout_is_the_manifest_and_the_map(quanto):
    with torch.device("meta"):
        model = Flux(flux_dev_params()).to(torch.bfloat16)
    qmap = xlabs_quantization_map(model)
    assert qmap == read_manifest("flux_dev_quantization_map.reconstructed.json")
    quantize_as_mapped(model, qmap, "built-in")
    assert quanto.quantization_map(model) == qmap and len(qmap) == 314

    manifest = read_manifest("flux-dev-fp8.xlabs-quanto.manifest.json")["tensors"]
    state = model.state_dict()
    assert list(state) == list(manifest)  # same keys, same order
    assert all(list(v.shape) == manifest[k]["shape"] for k, v in state.items())
    # The manifest records quanto 0.2.4 dtypes: float32 input/output scales. quanto 0.2.7 registers them
    # in the weight dtype (bf16). Every other dtype must be identical.
    differing = {k for k, v in state.items() if str(v.dtype).removeprefix("torch.") != manifest[k]["dtype"]}
    scale_keys = {k for k in state if k.endswith((".input_scale", ".output_scale"))}
    assert differing == scale_keys and len(scale_keys) == 628
    assert {manifest[k]["dtype"] for k in scale_keys} == {"float32"}
    assert {state[k].dtype for k in scale_keys} == {torch.bfloat16}
    # A file laid out as the manifest says (either scale dtype) passes the loader's strict check.
    ours = expected_state(model)
    codes = {"float8_e4m3fn": "F8_E4M3", "bfloat16": "BF16", "float32": "F32"}
    header = {k: (tuple(v["shape"]), codes[v["dtype"]]) for k, v in manifest.items()}
    check_header(ours, header, "manifest")
    header["img_in.weight._data"] = ((3072, 64), "BF16")
    with pytest.raises(CheckpointError, match=r"img_in.weight._data: file BF16 vs model F8_E4M3"):
        check_header(ours, header, "manifest")


@pytest.fixture(scope="module")
def quanto_checkpoint(tmp_path_factory, quanto):
    """A tiny bf16 Flux quantized with quanto (qfloat8, frozen), saved as safetensors + map JSON."""
    folder = tmp_path_factory.mktemp("quanto")
    reference = tiny_model(fresh_seed())
    quantized = copy.deepcopy(reference).to(torch.bfloat16)
    quanto.quantize(quantized, weights=quanto.qfloat8)
    quanto.freeze(quantized)
    state = {k: v.contiguous() for k, v in quantized.state_dict().items()}
    save_file(state, str(folder / "fp8.safetensors"))
    (folder / "map.json").write_text(json.dumps(quanto.quantization_map(quantized)))
    return folder, reference, quantized, state


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])  # quanto 0.2.7 / 0.2.4 files
def test_quanto_round_trip_is_exact_and_close_to_bf16(quanto, quanto_checkpoint, tmp_path, scale_dtype):
    folder, reference, quantized, state = quanto_checkpoint
    path = tmp_path / "fp8.safetensors"
    save_file(
        {k: v.to(scale_dtype) if k.endswith("_scale") and v.ndim == 0 else v for k, v in state.items()},
        str(path),
    )
    loaded = load_quanto(path, folder / "map.json", tiny_flux_params(), "cpu")
    assert same_state(loaded.state_dict(), state)
    assert not any(p.requires_grad for p in loaded.parameters())

    # x-flux's way (requantize into a bf16 model built on the CPU) gives the same model.
    xflux = Flux(tiny_flux_params()).to(torch.bfloat16)
    quanto.requantize(xflux, load_file(str(path)), json.loads((folder / "map.json").read_text()), "cpu")
    assert same_state(xflux.state_dict(), state)

    inputs = random_inputs(tiny_flux_params(), dtype=torch.bfloat16, seed=fresh_seed())
    with torch.no_grad():
        out = loaded(**inputs)
        assert torch.equal(out, quantized(**inputs))
        unquantized = copy.deepcopy(reference).to(torch.bfloat16)(**inputs)
    # Against the same model in bf16 (not float32: bf16 timesteps alone move this random model's
    # output by 2-6%). qfloat8 weights in every Linear, the final projection included: measured
    # 3.6-3.8% relative error over 10 seeds; bounded at 6%.
    assert 1e-3 < rel_err(out, unquantized) < 6e-2


def _save_edited(state: dict, tmp_path: Path, edit) -> Path:
    state = dict(state)
    edit(state)
    path = tmp_path / "edited.safetensors"
    save_file(state, str(path))
    return path


@pytest.mark.parametrize(
    "edit,expected",
    [
        (
            lambda s: s.pop("double_blocks.1.img_attn.qkv.weight._scale"),
            "1 missing key(s): double_blocks.1.img_attn.qkv.weight._scale",
        ),
        (lambda s: s.update({"pulid_ca.0.weight": torch.zeros(2)}), "unexpected key(s): pulid_ca.0.weight"),
        (
            lambda s: s.update({"txt_in.weight._data": s["txt_in.weight._data"].view(torch.uint8)}),
            "txt_in.weight._data: file U8 vs model F8_E4M3",
        ),
    ],
)
def test_quanto_checkpoint_mismatch_names_file_and_keys(quanto_checkpoint, tmp_path, edit, expected):
    folder, _, _, state = quanto_checkpoint
    path = _save_edited(state, tmp_path, edit)
    with pytest.raises(CheckpointError) as err:
        load_quanto(path, folder / "map.json", tiny_flux_params(), "cpu")
    assert expected in str(err.value) and str(path) in str(err.value)


def test_wrong_files_for_the_quanto_loader_are_explained(quanto_checkpoint, tmp_path):
    folder, reference, _, _ = quanto_checkpoint
    params = tiny_flux_params()
    bf16 = tmp_path / "flux1-dev.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in reference.state_dict().items()}, str(bf16))
    with pytest.raises(CheckpointError, match="high-precision checkpoint") as err:
        load_quanto(bf16, folder / "map.json", params, "cpu")
    assert "missing key(s): double_blocks.0.img_attn.proj.input_scale" in str(err.value)
    assert "unexpected key(s): double_blocks.0.img_attn.proj.weight," in str(err.value)

    qmap = json.loads((folder / "map.json").read_text())
    del qmap["img_in"]  # the map and the file disagree: the file is then wrong for that map
    (tmp_path / "short.json").write_text(json.dumps(qmap))
    with pytest.raises(CheckpointError, match=r"missing key\(s\): img_in.weight\n") as err:
        load_quanto(folder / "fp8.safetensors", tmp_path / "short.json", params, "cpu")
    message = str(err.value)
    assert "short.json" in message
    assert "unexpected key(s): img_in.input_scale, img_in.output_scale, img_in.weight._data" in message

    (tmp_path / "extra.json").write_text(json.dumps({**qmap, "pulid_ca.0": qmap["txt_in"]}))
    with pytest.raises(CheckpointError, match="does not have: pulid_ca.0"):
        load_quanto(folder / "fp8.safetensors", tmp_path / "extra.json", params, "cpu")

    with pytest.raises(CheckpointError, match=r"map.json is a text file, not a safetensors file"):
        load_quanto(folder / "map.json", folder / "map.json", params, "cpu")
    with pytest.raises(CheckpointError, match=r"map .*fp8.safetensors is not a readable JSON file"):
        load_quanto(folder / "fp8.safetensors", folder / "fp8.safetensors", params, "cpu")


def test_missing_quanto_says_how_to_install(monkeypatch, quanto_checkpoint):
    folder, _, _, _ = quanto_checkpoint
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)
    with pytest.raises(ImportError, match=r"pip install -r requirements-fp8.txt"):
        load_quanto(folder / "fp8.safetensors", None, tiny_flux_params(), "cpu")


# ---------------------------------------------------------------- native fp8 fast path


def round_to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """float64 round-to-nearest-even onto the float8_e4m3fn grid (3 mantissa bits, min exponent -6)."""
    _, exponent = torch.frexp(v)  # v = m * 2**exponent, 0.5 <= |m| < 1
    step = torch.pow(2.0, (torch.clamp(exponent - 1, min=-6) - 3).to(F64))
    return torch.round(v / step) * step  # exact division by a power of two; torch.round ties to even


def reference_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (as float64 values) and scales: scale = amax * float32(1/448) in float32, code = e4m3(x/scale).

    Product and quotient are rounded to float32, as the kernel computes them (the float64 product of
    two float32 numbers is exact; float64 then float32 is the correctly rounded float32 quotient,
    as 53 >= 2*24+2 bits).
    """
    x = x.to(F64)
    reciprocal = torch.tensor(1 / 448, dtype=torch.float32).item()
    scale = (x.abs().amax(dim=-1, keepdim=True) * reciprocal).float().to(F64)
    quotient = (x / scale).float().to(F64).clamp(-448, 448)
    return round_to_e4m3(quotient), scale


def random_rows(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """Entries spread over 8 decades (e4m3 subnormals, zeros after rounding) and rows over 6."""
    x = torch.randn(rows, cols, generator=generator, dtype=F64)
    x *= 10 ** (torch.rand(rows, cols, generator=generator, dtype=F64) * -8)
    return (x * 10 ** (torch.rand(rows, 1, generator=generator, dtype=F64) * 6 - 3)).float()


def test_quantize_rowwise_matches_float64_reference():
    g = torch.Generator().manual_seed(fresh_seed())
    x = random_rows(33, 256, g)
    codes, scale = quantize_rowwise(x)
    ref_codes, ref_scale = reference_rowwise(x)
    assert codes.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (33, 1)
    assert torch.equal(scale.to(F64), ref_scale)
    assert torch.equal(codes.to(F64), ref_codes)  # exact: no tolerance
    assert (ref_codes.abs() < 2**-6).sum() > 0 and (ref_codes == 0).sum() > 0  # subnormals were exercised
    zero_codes, zero_scale = quantize_rowwise(torch.zeros(2, 16))
    assert not zero_codes.float().any() and bool((zero_scale > 0).all())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 8e-3)])
def test_fp8_linear_matches_float64_reference(dtype, tol):
    """float32: only the float32 sum and scaling differ (measured <= 2.4e-7); bf16: plus output rounding."""
    g = torch.Generator().manual_seed(fresh_seed())
    linear = nn.Linear(320, 192).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(random_rows(192, 320, g))
        linear.bias.copy_(torch.randn(192, generator=g))
    x = random_rows(2 * 7, 320, g).reshape(2, 7, 320).to(dtype)
    layer = Fp8Linear.from_linear(linear)
    out = layer(x)

    w_codes, w_scale = reference_rowwise(linear.weight.float())
    x_codes, x_scale = reference_rowwise(x.reshape(-1, 320).float())
    ref = (x_codes * x_scale) @ (w_codes * w_scale).T + linear.bias.to(F64)
    assert out.dtype == dtype and out.shape == (2, 7, 192)
    assert torch.equal(layer.weight.to(F64), w_codes) and torch.equal(layer.weight_scale.to(F64), w_scale)
    assert rel_err(out.reshape(-1, 192), ref) < tol


def test_fp8_linear_error_against_the_float_linear():
    """Row-wise e4m3 of weights and activations: ~3.5% relative error per product on random data."""
    torch.manual_seed(fresh_seed())
    linear = nn.Linear(512, 256)
    x = torch.randn(64, 512)
    with torch.no_grad():
        exact = linear(x) - linear.bias
        approx = Fp8Linear.from_linear(linear)(x) - linear.bias
    assert 0.01 < rel_err(approx, exact) < 0.06


def test_cpu_scaled_mm_agrees_with_the_emulation():
    g = torch.Generator().manual_seed(fresh_seed())
    x_codes, x_scale = quantize_rowwise(torch.randn(48, 128, generator=g))
    w_codes, w_scale = quantize_rowwise(torch.randn(64, 128, generator=g))
    bias = torch.randn(64, generator=g)
    try:
        out = torch._scaled_mm(
            x_codes,
            w_codes.t(),
            scale_a=x_scale,
            scale_b=w_scale.view(1, -1),
            bias=bias,
            out_dtype=torch.float32,
        )
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"torch._scaled_mm does not run on this CPU build: {err}")
    assert rel_err(out, emulated_mm_rowwise(x_codes, x_scale, w_codes, w_scale, bias)) < 1e-6

    linear = nn.Linear(128, 64).to(torch.bfloat16)
    layer = Fp8Linear.from_linear(linear)
    x = torch.randn(3, 16, 128, generator=g).to(torch.bfloat16)
    emulated = layer(x)
    layer.backend = "scaled_mm"
    # Both round the same float32 result to bf16 (2^-9 relative); only the summation order differs.
    assert rel_err(layer(x), emulated) < 2e-3  # measured <= 2.5e-4 over 30 seeds


def test_tiny_flux_with_fp8_blocks_stays_close_to_float32():
    model = tiny_model(fresh_seed())
    inputs = random_inputs(tiny_flux_params(), dtype=torch.float32, seed=fresh_seed())
    fp8 = copy.deepcopy(model)
    quantize_linears_to_fp8(fp8)
    with torch.no_grad():
        error = rel_err(fp8(**inputs), model(**inputs))
    # Measured 0.47-0.70% over 36 seeds (the blocks make ~10% of this random model's output); bound 1.5%.
    assert 5e-4 < error < 1.5e-2


def test_quantize_linears_to_fp8_replaces_only_block_linears():
    model = tiny_model(fresh_seed())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    replaced = quantize_linears_to_fp8(model)
    params = tiny_flux_params()
    assert len(replaced) == 10 * params.depth + 3 * params.depth_single_blocks
    assert {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)} == set(replaced)
    assert all(n.startswith(("double_blocks.", "single_blocks.")) for n in replaced)
    assert {n for n, m in model.named_modules() if type(m) is nn.Linear} == {
        "img_in",
        "txt_in",
        "time_in.in_layer",
        "time_in.out_layer",
        "vector_in.in_layer",
        "vector_in.out_layer",
        "guidance_in.in_layer",
        "guidance_in.out_layer",
        "final_layer.linear",
        "final_layer.adaLN_modulation.1",
    }

    state = model.to(torch.bfloat16).state_dict()  # codes and scales must keep their dtypes
    fp8_keys = {f"{n}.weight_scale" for n in replaced}
    assert state.keys() == before.keys() | fp8_keys
    for name in replaced:
        out_features, in_features = before[f"{name}.weight"].shape
        assert state[f"{name}.weight"].dtype == torch.float8_e4m3fn
        assert state[f"{name}.weight"].shape == (out_features, in_features)
        assert state[f"{name}.weight_scale"].dtype == torch.float32
        assert state[f"{name}.weight_scale"].shape == (out_features, 1)
        assert state[f"{name}.bias"].dtype == torch.bfloat16
        assert torch.equal(state[f"{name}.bias"], before[f"{name}.bias"].to(torch.bfloat16))
    untouched = {k for k in before if not k.startswith(tuple(f"{n}." for n in replaced))}
    assert all(torch.equal(state[k], before[k].to(torch.bfloat16)) for k in untouched)

    kept = tiny_model(0)
    replaced = quantize_linears_to_fp8(kept, exclude=FP8_MODULATION)
    assert not any("mod" in n for n in replaced) and len(replaced) == 8 * params.depth + 2 * 3


def test_streaming_fp8_load_equals_quantizing_the_loaded_model(tmp_path):
    model = tiny_model(fresh_seed())
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "flux1-dev.safetensors"
    save_file(state, str(path))
    streamed = load_flow_model(path, tiny_flux_params(), "cpu", fmt=NativeFp8Format())
    in_place = load_flow_model(path, tiny_flux_params(), "cpu")
    quantize_linears_to_fp8(in_place)
    assert same_state(streamed.state_dict(), in_place.state_dict())
    assert not any(t.is_meta for t in streamed.state_dict().values())

    del state["single_blocks.2.linear2.weight"]
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"missing key\(s\): single_blocks.2.linear2.weight"):
        load_flow_model(path, tiny_flux_params(), "cpu", fmt=NativeFp8Format())


def test_fp8_linear_compiles_to_one_graph():
    """No graph break in forward (device checks are not data-dependent): the GPU can fuse the quantisation."""
    layer = Fp8Linear.from_linear(nn.Linear(64, 48))
    x = torch.randn(2, 5, 64)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), layer(x))
