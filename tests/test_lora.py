"""LoRA: the file layouts, the side path's numbers, strictness, and a request's LoRAs leaving nothing behind.

Reference for the numbers: for every adapted Linear, its output under the LoRAs must equal
``x @ (W + sum_i strength_i * (alpha_i / rank_i) * up_i @ down_i).T + b`` computed in float64 from
the factors the test wrote (not from what the loader read). Tolerance: the side path runs in the
model's dtype, float32 here, so 2e-5 relative to the output's scale.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flux.lora import ActiveLoRA, LoRAAdapters, LoRAError, lora_targets, read_lora
from flux.model import Flux
from pulid.catalogue import SPEED_LORAS
from pulid.loras import LoRAChoice, LoRALibrary, parse_lora_option
from pulid.request import GenerationRequest, InvalidRequestError
from tiny_random.loras import (
    random_factors,
    write_bfl,
    write_diffusers,
    write_kohya,
    write_xlabs,
    xlabs_layers,
)
from tiny_random.models import tiny_flux_params

RTOL = 2e-5


def tiny_flow(seed: int = 0) -> Flux:
    torch.manual_seed(seed)
    return Flux(tiny_flux_params()).eval()


def flow_inputs(flow: Flux, seed: int = 1, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    p = flow.params
    img_tokens, txt_tokens = 16, 5
    return dict(
        img=torch.randn(batch, img_tokens, p.in_channels, generator=g),
        img_ids=torch.randint(0, 4, (batch, img_tokens, 3), generator=g).float(),
        txt=torch.randn(batch, txt_tokens, p.context_in_dim, generator=g),
        txt_ids=torch.zeros(batch, txt_tokens, 3),
        timesteps=torch.rand(batch, generator=g),
        y=torch.randn(batch, p.vec_in_dim, generator=g),
        guidance=torch.full((batch,), 3.5),
    )


def record_linears(flow: Flux, names):
    """Forward hooks, registered after the LoRA slots, that keep each layer's input and output."""
    seen, hooks = {}, []
    modules = dict(flow.named_modules())
    for name in names:

        def keep(module, args, output, name=name):
            seen[name] = (args[0].detach().clone(), output.detach().clone())

        hooks.append(modules[name].register_forward_hook(keep))
    return seen, hooks


def expected_output(flow: Flux, name: str, x: torch.Tensor, updates) -> torch.Tensor:
    """float64 ``x @ (W + sum strength * alpha/rank * up @ down).T + b``."""
    module = dict(flow.named_modules())[name]
    weight = module.weight.double().clone()
    for factors, strength in updates:
        if name in factors:
            f = factors[name]
            weight += strength * (f.alpha / f.rank) * (f.up.double() @ f.down.double())
    out = x.double() @ weight.T
    return out if module.bias is None else out + module.bias.double()


def test_every_layout_reads_to_the_same_update(tmp_path):
    flow = tiny_flow()
    targets = lora_targets(flow)
    factors = random_factors(flow, rank=3, seed=1, alpha=1.5)
    same_scale = random_factors(flow, rank=3, seed=2, alpha=3.0)  # alpha = rank for the alpha-less files
    xlabs = random_factors(flow, rank=3, seed=3, names=xlabs_layers(flow))
    for name, f in xlabs.items():
        if name.endswith("linear1"):
            f.up[3 * f.down.shape[1] :] = 0  # XLabs adapts only q, k, v of linear1
    files = {
        "kohya": (write_kohya(tmp_path / "k.safetensors", factors), factors),
        "bfl": (write_bfl(tmp_path / "b.safetensors", factors), factors),
        "bfl bare": (write_bfl(tmp_path / "bb.safetensors", factors, prefix=""), factors),
        "diffusers": (write_diffusers(tmp_path / "d.safetensors", factors), factors),
        "diffusers metadata": (write_diffusers(tmp_path / "dm.safetensors", factors, "metadata"), factors),
        "diffusers no alpha": (write_diffusers(tmp_path / "dn.safetensors", same_scale, "none"), same_scale),
        "xlabs": (write_xlabs(tmp_path / "x.safetensors", xlabs), xlabs),
    }
    for label, (path, written) in files.items():
        lora = read_lora(path, targets)
        assert set(lora.layers) == set(written), label
        for name, f in written.items():
            reference = (f.alpha / f.rank) * f.up.double() @ f.down.double()
            assert torch.allclose(lora.layers[name].delta(), reference, rtol=1e-6, atol=1e-7), (label, name)
    assert read_lora(files["xlabs"][0], targets).layouts == ("XLabs",)
    assert read_lora(files["diffusers"][0], targets).layouts == ("diffusers",)


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "side path"])
def test_patched_forward_matches_float64_for_every_adapted_layer(tmp_path, merge):
    flow = tiny_flow()
    adapters = LoRAAdapters(flow, "cpu", torch.float32)
    first = random_factors(flow, rank=3, seed=4, alpha=1.5)
    second = random_factors(flow, rank=2, seed=5, names=[n for n in first if "single_blocks" in n])
    files = [
        read_lora(write_kohya(tmp_path / "a.safetensors", first), adapters.targets),
        read_lora(write_diffusers(tmp_path / "b.safetensors", second), adapters.targets),
    ]
    strengths = [0.7, -0.4]
    seen, hooks = record_linears(flow, adapters.targets)
    active = [ActiveLoRA(f.name, f.layers, s) for f, s in zip(files, strengths, strict=True)]
    with torch.no_grad(), adapters.applied(active, merge=merge):
        flow(**flow_inputs(flow))
    assert adapters.last_mode == ("merged" if merge else "side path")
    for hook in hooks:
        hook.remove()
    assert set(seen) == set(adapters.targets) and set(first) == set(adapters.targets)
    for name, (x, out) in seen.items():
        want = expected_output(flow, name, x, [(first, 0.7), (second, -0.4)])
        scale = want.abs().max().item()
        assert (out.double() - want).abs().max().item() <= RTOL * scale + 1e-6, name


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "side path"])
def test_a_lora_changes_the_output_and_leaves_the_model_bit_identical(tmp_path, merge):
    flow = tiny_flow()
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    adapters = LoRAAdapters(flow, "cpu", torch.float32)
    inputs = flow_inputs(flow)
    with torch.no_grad():
        base = flow(**inputs)
    lora = read_lora(write_bfl(tmp_path / "l.safetensors", random_factors(flow, seed=6)), adapters.targets)
    with torch.no_grad():
        with adapters.applied([ActiveLoRA(lora.name, lora.layers, 1.0)], merge=merge):
            changed = flow(**inputs)
        after = flow(**inputs)
        with adapters.applied([ActiveLoRA(lora.name, lora.layers, 0.0)], merge=merge):
            zero = flow(**inputs)
    assert (changed - base).abs().max() > 1e-3
    assert torch.equal(after, base) and torch.equal(zero, base)
    assert all(torch.equal(before[k], v) for k, v in flow.state_dict().items())
    adapters.close()
    assert not any(m._forward_hooks for m in flow.modules())


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "side path"])
def test_an_error_inside_the_block_still_restores_the_model(tmp_path, merge):
    flow = tiny_flow()
    adapters = LoRAAdapters(flow, "cpu", torch.float32)
    lora = read_lora(write_kohya(tmp_path / "l.safetensors", random_factors(flow, seed=7)), adapters.targets)
    inputs = flow_inputs(flow)
    with torch.no_grad():
        base = flow(**inputs)
        before = {k: v.clone() for k, v in flow.state_dict().items()}
        with (
            pytest.raises(KeyboardInterrupt),
            adapters.applied([ActiveLoRA("l", lora.layers, 1.0)], merge=merge),
        ):
            flow(**inputs)
            raise KeyboardInterrupt  # a cancel, an out-of-memory error...
        assert torch.equal(flow(**inputs), base)
        assert all(torch.equal(before[k], v) for k, v in flow.state_dict().items())


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "side path"])
def test_compiled_blocks_apply_loras_and_keep_their_graphs_when_only_strength_changes(tmp_path, merge):
    from torch._dynamo.utils import counters

    from flux.compile import compile_repeated_blocks

    torch._dynamo.reset()
    flow = tiny_flow()
    eager = tiny_flow()
    adapters = LoRAAdapters(flow, "cpu", torch.float32)  # before compiling, as the loader does
    eager_adapters = LoRAAdapters(eager, "cpu", torch.float32)
    compile_repeated_blocks(flow, backend="eager")
    lora = read_lora(write_kohya(tmp_path / "l.safetensors", random_factors(flow, seed=8)), adapters.targets)
    inputs = flow_inputs(flow)

    def run(model, slots, strength):
        with torch.no_grad(), slots.applied([ActiveLoRA("l", lora.layers, strength)], merge=merge):
            return model(**inputs)

    with torch.no_grad():
        base = flow(**inputs)
    first = run(flow, adapters, 1.0)
    graphs = counters["stats"]["unique_graphs"]
    second = run(flow, adapters, -0.5)
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation for a new strength
    assert not counters["graph_break"]  # the side path is inside the blocks' graphs
    other = read_lora(
        write_bfl(tmp_path / "o.safetensors", random_factors(flow, rank=5, seed=9)), adapters.targets
    )
    with torch.no_grad(), adapters.applied([ActiveLoRA("o", other.layers, 1.0)], merge=merge):
        flow(**inputs)
    assert counters["stats"]["unique_graphs"] == graphs  # rank 5 is padded as rank 4 was: same graphs
    assert torch.allclose(first, run(eager, eager_adapters, 1.0), rtol=1e-5, atol=1e-6)
    assert torch.allclose(second, run(eager, eager_adapters, -0.5), rtol=1e-5, atol=1e-6)
    assert (first - base).abs().max() > 1e-3
    with torch.no_grad():
        assert torch.equal(flow(**inputs), base)
    torch._dynamo.reset()


def test_ranks_are_padded_to_few_sizes_and_the_padding_changes_nothing(tmp_path):
    from flux.lora.adapters import rank_bucket

    assert [rank_bucket(r) for r in (1, 4, 16, 17, 48, 64, 65, 192)] == [16, 16, 16, 32, 64, 64, 128, 256]
    flow = tiny_flow()
    adapters = LoRAAdapters(flow, "cpu", torch.float64)
    flow.double()
    factors = random_factors(flow, rank=3, seed=15)
    lora = read_lora(write_kohya(tmp_path / "l.safetensors", factors), adapters.targets)
    seen, hooks = record_linears(flow, ["single_blocks.0.linear1"])
    inputs = {k: v.double() for k, v in flow_inputs(flow).items()}
    with torch.no_grad(), adapters.applied([ActiveLoRA("l", lora.layers, 1.0)], merge=False):
        flow(**inputs)
    for hook in hooks:
        hook.remove()
    active = [ActiveLoRA("l", lora.layers, 1.0)]
    assert adapters.factor_bytes() == LoRAAdapters.factor_bytes_of(active, torch.float64)
    x, out = seen["single_blocks.0.linear1"]
    want = expected_output(flow, "single_blocks.0.linear1", x, [(factors, 1.0)])
    assert torch.allclose(out, want, rtol=1e-12, atol=1e-12)  # float64: the padding adds exact zeros


def test_fp8_layers_take_the_side_path_in_high_precision(tmp_path):
    """The fp8 layer's own output (its emulation on CPU) plus the float side path, exactly."""
    from flux.quant import Fp8Linear, quantize_linears_to_fp8

    flow = tiny_flow()
    factors = random_factors(flow, rank=3, seed=9)
    quantize_linears_to_fp8(flow)
    adapters = LoRAAdapters(flow, "cpu", torch.float32)
    fp8_names = [n for n, m in flow.named_modules() if isinstance(m, Fp8Linear)]
    assert fp8_names and set(fp8_names) <= set(adapters.targets)
    lora = read_lora(write_kohya(tmp_path / "l.safetensors", factors), adapters.targets)
    seen, hooks = record_linears(flow, fp8_names)
    with torch.no_grad(), adapters.applied([ActiveLoRA("l", lora.layers, 0.8)], merge=False):
        flow(**flow_inputs(flow))
    assert adapters.last_mode == "side path"
    for hook in hooks:
        hook.remove()
    modules = dict(flow.named_modules())
    for name in fp8_names:
        x, out = seen[name]
        with torch.no_grad():
            plain = modules[name](x)  # the fp8 layer alone (slots are empty again)
        f = factors[name]
        side = 0.8 * (f.alpha / f.rank) * (x.double() @ f.down.double().T) @ f.up.double().T
        assert torch.allclose(out.double(), plain.double() + side, rtol=1e-5, atol=1e-5), name


def test_fp8_layers_merge_by_requantising_and_get_their_codes_back(tmp_path):
    """Merged, an fp8 layer is requantised from its dequantised weight plus the update (float64
    reference here, so the codes may differ by rounding only); afterwards, its old codes exactly."""
    from flux.quant import Fp8Linear, quantize_linears_to_fp8

    flow = tiny_flow()
    factors = random_factors(flow, rank=3, seed=17)
    quantize_linears_to_fp8(flow)
    adapters = LoRAAdapters(flow, "cpu", torch.float32)
    fp8 = {n: m for n, m in flow.named_modules() if isinstance(m, Fp8Linear)}
    before = {n: (m.weight.clone(), m.weight_scale.clone()) for n, m in fp8.items()}
    lora = read_lora(write_kohya(tmp_path / "l.safetensors", factors), adapters.targets)
    seen, hooks = record_linears(flow, fp8)
    with torch.no_grad(), adapters.applied([ActiveLoRA("l", lora.layers, 0.8)]):
        flow(**flow_inputs(flow))
        assert adapters.last_mode == "merged"
        for name, module in fp8.items():
            f = factors[name]
            summed = before[name][0].double() * before[name][1].double()
            summed += 0.8 * (f.alpha / f.rank) * f.up.double() @ f.down.double()
            merged = module.dequantized_weight().double()
            old = before[name][0].double() * before[name][1].double()
            error = (merged - summed).norm() / summed.norm()
            assert error < 0.03, (name, error)  # fp8's own rounding of W + delta (about 2%)
            assert (merged - summed).norm() < 0.5 * (old - summed).norm(), name  # the update is in
            x, out = seen[name]
            assert torch.equal(out, module(x)), name  # what ran was this requantised layer
    for hook in hooks:
        hook.remove()
    for name, module in fp8.items():
        assert torch.equal(module.weight.view(torch.uint8), before[name][0].view(torch.uint8))
        assert torch.equal(module.weight_scale, before[name][1])


def test_quanto_layers_take_the_side_path(tmp_path):
    """XLabs' quanto layers cannot take a merge: the update runs beside them, exactly."""
    quanto = pytest.importorskip("optimum.quanto")  # requirements-fp8.txt, installed in CI

    flow = tiny_flow()
    factors = random_factors(flow, rank=2, seed=18)
    quanto.quantize(flow, weights=quanto.qfloat8)
    quanto.freeze(flow)
    adapters = LoRAAdapters(flow, "cpu", torch.float32)
    lora = read_lora(write_kohya(tmp_path / "l.safetensors", factors), adapters.targets)
    seen, hooks = record_linears(flow, ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear2"])
    with torch.no_grad(), adapters.applied([ActiveLoRA("l", lora.layers, 1.0)]):
        flow(**flow_inputs(flow))
    assert adapters.last_mode == "side path"
    for hook in hooks:
        hook.remove()
    modules = dict(flow.named_modules())
    for name, (x, out) in seen.items():
        with torch.no_grad():
            plain = modules[name](x)
        f = factors[name]
        side = (f.alpha / f.rank) * (x.double() @ f.down.double().T) @ f.up.double().T
        assert torch.allclose(out.double(), plain.double() + side, rtol=1e-5, atol=1e-5), name


# ---- strictness -------------------------------------------------------------------------------


def lora_error(tmp_path, tensors, name="bad.safetensors", metadata=None) -> str:
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(LoRAError) as caught:
        read_lora(path, lora_targets(tiny_flow()))
    return str(caught.value)


def test_a_key_that_names_no_layer_is_refused_naming_file_and_key(tmp_path):
    message = lora_error(
        tmp_path,
        {
            "lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight": torch.zeros(2, 64),
            "lora_unet_double_blocks_7_img_attn_qkv.lora_up.weight": torch.zeros(192, 2),
        },
    )
    assert "bad.safetensors" in message and "lora_unet_double_blocks_7_img_attn_qkv" in message


def test_a_shape_that_does_not_fit_is_refused_with_what_was_expected(tmp_path):
    message = lora_error(
        tmp_path,
        {
            "diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight": torch.zeros(4, 96),
            "diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight": torch.zeros(64, 4),
        },
    )
    assert "double_blocks.0.img_attn.proj" in message and "(rank, 64)" in message


@pytest.mark.parametrize(
    ("tensors", "metadata", "said"),
    [
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8)}, None, "UNet"),
        ({"lora_unet_input_blocks_4_1_proj_in.alpha": torch.tensor(1.0)}, None, "UNet"),
        (
            {"double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(2, 64)},
            {"modelspec.architecture": "flux-1-schnell/lora"},
            "schnell",
        ),
        (
            {"double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(2, 64)},
            {"modelspec.architecture": "flux-2-dev/lora"},
            "FLUX.2",
        ),
        ({"double_stream_modulation_img.lin.lora_A.weight": torch.zeros(2, 64)}, None, "FLUX.2"),
        (
            {"transformer.joint_blocks.0.x_block.attn.qkv.lora_A.weight": torch.zeros(2, 64)},
            None,
            "Stable Diffusion 3",
        ),
    ],
)
def test_a_lora_for_another_model_is_named_as_such(tmp_path, tensors, metadata, said):
    assert said in lora_error(tmp_path, tensors, metadata=metadata)


def test_other_adapter_kinds_half_pairs_and_pickles_are_refused(tmp_path):
    dora = lora_error(tmp_path, {"lora_unet_img_in.dora_scale": torch.ones(1, 64)})
    assert "DoRA" in dora
    half = lora_error(tmp_path, {"lora_unet_img_in.lora_down.weight": torch.zeros(2, 64)})
    assert "lora_unet_img_in" in half and "up" in half
    assert "not a LoRA weight" in lora_error(tmp_path, {"img_in.weight": torch.zeros(64, 64)})
    ints = lora_error(tmp_path, {"lora_unet_img_in.lora_down.weight": torch.zeros(2, 64, dtype=torch.int32)})
    assert "F32" in ints
    pickle = tmp_path / "old.ckpt"
    pickle.write_bytes(b"not read")
    with pytest.raises(LoRAError, match="safetensors"):
        read_lora(pickle, lora_targets(tiny_flow()))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\xff" * 64)
    with pytest.raises(LoRAError, match="broken.safetensors"):
        read_lora(broken, lora_targets(tiny_flow()))


def test_text_encoder_layers_are_reported_as_ignored(tmp_path, caplog):
    flow = tiny_flow()
    path = write_kohya(tmp_path / "with-te.safetensors", random_factors(flow, seed=10), text_encoder_layers=3)
    library = LoRALibrary(tmp_path, lora_targets(flow), allow_download=False)
    with caplog.at_level("WARNING"):
        lora = library.load(LoRAChoice(str(path)))
    assert lora.ignored_summary() == "CLIP-L: 3 layers"
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in caplog.text


# ---- where LoRAs come from ----------------------------------------------------------------------


def test_the_library_lists_its_folder_and_the_speed_loras_and_finds_any_file(tmp_path):
    flow = tiny_flow()
    folder = tmp_path / "loras"
    write_kohya(folder / "people" / "anna.safetensors", random_factors(flow, seed=11))
    outside = write_kohya(tmp_path / "outside.safetensors", random_factors(flow, seed=12))
    library = LoRALibrary(folder, lora_targets(flow), allow_download=False)
    names = library.names()
    assert "people/anna.safetensors" in names
    assert not set(SPEED_LORAS) & set(names)  # not here and no downloads: offering them would only fail
    with pytest.raises(LoRAError, match="downloads are disabled"):
        library.resolve("FLUX.1-Turbo-Alpha")  # the CLI and Python API are told what to get
    write_kohya(folder / "FLUX.1-Turbo-Alpha.safetensors", random_factors(flow, seed=13))
    names = library.names()
    assert names[0] == "FLUX.1-Turbo-Alpha" and "FLUX.1-Turbo-Alpha.safetensors" not in names
    assert library.load(LoRAChoice("people/anna.safetensors")) is library.load(
        LoRAChoice("people/anna.safetensors")
    )
    assert library.resolve(str(outside)) == outside  # the CLI and Python API may name any file
    with pytest.raises(LoRAError, match="owner/repo/file.safetensors"):
        library.resolve("nowhere.safetensors")


def test_a_hub_reference_offline_says_what_to_get(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    library = LoRALibrary(tmp_path / "loras", lora_targets(tiny_flow()))
    with pytest.raises(LoRAError) as caught:
        library.resolve("someone/styles/ink.safetensors")
    assert "HF_HUB_OFFLINE" in str(caught.value) and "someone/styles/ink.safetensors" in str(caught.value)


def test_a_lora_is_located_without_fetching_and_refused_early(tmp_path):
    """What generate.py checks before loading any model: where each --lora is, fetching nothing."""
    from flux.hub import HubWeights
    from pulid.loras import locate_lora

    folder = tmp_path / "loras"
    (folder / "people").mkdir(parents=True)
    (folder / "people" / "anna.safetensors").write_bytes(b"")
    elsewhere = tmp_path / "mine.safetensors"
    elsewhere.write_bytes(b"")
    assert (
        locate_lora("people/anna.safetensors", folder) == (folder / "people" / "anna.safetensors").resolve()
    )
    assert locate_lora(str(elsewhere), folder) == elsewhere
    # the name the image's metadata and A1111 text record (<lora:people/anna:0.8>): no suffix
    assert locate_lora("people/anna", folder) == (folder / "people" / "anna.safetensors").resolve()
    hub = locate_lora("someone/styles/ink.safetensors", folder)
    assert isinstance(hub, HubWeights) and hub.repo_id == "someone/styles" and not (tmp_path / "hub").exists()
    assert isinstance(locate_lora("FLUX.1-Turbo-Alpha", folder), HubWeights)
    pickle = tmp_path / "old.ckpt"
    pickle.write_bytes(b"")
    for source, message in [
        ("nope.safetensors", "was not found: not a file in"),
        (str(pickle), "only .safetensors files are read"),
        ("../mine.safetensors", "was not found"),  # never outside the folder by a relative name
        ("  ", "without a name"),
    ]:
        with pytest.raises(LoRAError, match=message):
            locate_lora(source, folder)


def test_lora_options_and_request_checks():
    assert parse_lora_option("style.safetensors:0.8") == LoRAChoice("style.safetensors", 0.8)
    assert parse_lora_option("owner/repo/x.safetensors") == LoRAChoice("owner/repo/x.safetensors", 1.0)
    assert parse_lora_option("C:\\loras\\x.safetensors") == LoRAChoice("C:\\loras\\x.safetensors", 1.0)
    assert parse_lora_option("x.safetensors:-1.5").strength == -1.5
    assert parse_lora_option("C:\\loras\\x.safetensors:0.5") == LoRAChoice("C:\\loras\\x.safetensors", 0.5)
    with pytest.raises(LoRAError, match="the strength 'abc' is not a number"):
        parse_lora_option("style.safetensors:abc")  # was read as a file named "style.safetensors:abc"
    ok = GenerationRequest.from_values(prompt="p", loras=[("a.safetensors", "0.5")])
    assert ok.loras == (LoRAChoice("a.safetensors", 0.5),)
    for bad in (
        [("a", float("nan"))],
        [("a", 1e9)],
        [("", 1.0)],
        [("a", 1)] * 9,
        "a.safetensors",
        [("x" * 600, 1)],
    ):
        with pytest.raises(InvalidRequestError):
            GenerationRequest.from_values(prompt="p", loras=bad)


# ---- through the pipeline ---------------------------------------------------------------------


def test_a_request_with_loras_changes_the_image_records_them_and_leaves_the_dit_as_it_was(pipeline):
    folder = pipeline.lora_library.folder
    write_kohya(folder / "style.safetensors", random_factors(pipeline.dit, seed=13), text_encoder_layers=2)
    write_diffusers(folder / "detail.safetensors", random_factors(pipeline.dit, rank=2, seed=14))
    state = {k: v.clone() for k, v in pipeline.dit.state_dict().items()}
    settings = dict(prompt="a photo", width=256, height=256, num_steps=2, seed=5)
    plain = pipeline.generate(GenerationRequest(**settings))
    loras = (LoRAChoice("style.safetensors", 0.9), LoRAChoice("detail.safetensors", -0.3))
    styled = pipeline.generate(GenerationRequest(**settings, loras=loras))
    again = pipeline.generate(GenerationRequest(**settings))
    assert not torch.equal(plain.latents, styled.latents)
    assert torch.equal(plain.latents, again.latents)
    assert all(torch.equal(state[k], v) for k, v in pipeline.dit.state_dict().items())
    recorded = styled.metadata["loras"]
    assert [(r["name"], r["strength"]) for r in recorded] == [("style", 0.9), ("detail", -0.3)]
    from flux.lora.files import file_sha256

    assert recorded[0]["sha256"] == file_sha256(folder / "style.safetensors")[:12]
    assert recorded[0]["ignored"] == "CLIP-L: 2 layers" and "ignored" not in recorded[1]
    assert "loras" not in plain.metadata and styled.metadata["lora_mode"] == "merged"


def test_a_bad_lora_in_a_request_is_a_clear_request_error(pipeline, tmp_path):
    save_file(
        {"lora_unet_nothing_here.lora_down.weight": torch.zeros(2, 4)}, str(tmp_path / "odd.safetensors")
    )
    request = GenerationRequest(
        prompt="p", width=256, height=256, num_steps=1, loras=(LoRAChoice(str(tmp_path / "odd.safetensors")),)
    )
    with pytest.raises(InvalidRequestError, match="odd.safetensors"):
        pipeline.generate(request)


def test_under_a_vram_budget_loras_must_fit_beside_the_plan(pipeline):
    """The plan's denoising peak plus the LoRA factors must stay within the budget; the factors
    are freed after each denoising so the decoder's stage keeps its room."""
    from types import SimpleNamespace

    from flux.lora import LoRAAdapters as Adapters

    write_kohya(pipeline.lora_library.folder / "style.safetensors", random_factors(pipeline.dit, seed=13))
    request = GenerationRequest(
        prompt="p", width=256, height=256, num_steps=1, seed=1, loras=(LoRAChoice("style.safetensors"),)
    )
    active = [ActiveLoRA(f.name, f.layers, 1.0) for f in pipeline.load_loras(request)]
    need = Adapters.factor_bytes_of(active, pipeline.dtype)
    try:
        pipeline.placement = SimpleNamespace(
            plan=SimpleNamespace(budget=10**6, stage_peaks={"denoise": 10**6 - need + 1})
        )
        with pytest.raises(InvalidRequestError, match="raise --vram_budget"):
            pipeline.generate(request)
        pipeline.placement.plan.stage_peaks["denoise"] = 10**6 - need
        result = pipeline.generate(request)
        assert result.metadata["loras"][0]["name"] == "style"
        assert result.metadata["lora_mode"] == "side path"  # placed weights are never merged
        assert pipeline.lora_adapters.factor_bytes() == 0  # released after the denoising
    finally:
        pipeline.placement = None


def test_a1111_parameters_carry_lora_tags_and_hashes():
    from pulid.outputs import a1111_parameters

    text = a1111_parameters(
        {
            "prompt": "p",
            "num_steps": 8,
            "loras": [{"name": "turbo", "sha256": "abcdef123456", "strength": 1.0}],
        }
    )
    first, fields = text.split("\n")
    assert first == "p <lora:turbo:1>"
    assert 'Lora hashes: "turbo: abcdef123456"' in fields


def test_lora_metadata_survives_in_the_png(pipeline, tmp_path):
    from pulid.outputs import read_image_metadata, save_new_image

    write_kohya(pipeline.lora_library.folder / "style.safetensors", random_factors(pipeline.dit, seed=13))
    result = pipeline.generate(
        GenerationRequest(
            prompt="p",
            width=256,
            height=256,
            num_steps=1,
            seed=1,
            loras=(LoRAChoice("style.safetensors", 0.5),),
        )
    )
    path = save_new_image(result.image, result.metadata, tmp_path, 1, "png", 95)
    assert json.loads(json.dumps(read_image_metadata(path)["loras"])) == result.metadata["loras"]
    assert np.asarray(result.image).shape == (256, 256, 3)


def test_the_app_service_takes_only_listed_loras(pipeline, tmp_path):
    """Behind gradio's own check of the picker's choices, the service refuses any other source."""
    from pulid.serve.service import GenerationService, ServiceError

    outside = write_kohya(tmp_path / "outside.safetensors", random_factors(pipeline.dit, seed=16))
    service = GenerationService(pipeline, tmp_path / "out", listed_loras_only=True)
    assert "Hyper-FLUX.1-dev-8steps" not in service.lora_names()  # not here, and no downloads
    for source in (
        str(outside),
        "../outside.safetensors",
        "someone/repo/x.safetensors",
        "FLUX.1-Turbo-Alpha",
    ):
        request = GenerationRequest(
            prompt="p", width=256, height=256, num_steps=1, loras=(LoRAChoice(source),)
        )
        with pytest.raises(ServiceError, match="not one of this app's LoRAs"):
            service.run(request)


def test_the_cli_checks_a_lora_against_the_real_dit_before_loading_anything(tmp_path, cli_in_process):
    """A LoRA for another model, or one for FLUX.1-dev, is told apart against the full-size DiT's
    layers built without weights, before the (here missing) weights would load."""

    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_input_blocks_4_1_proj_in.alpha": torch.tensor(1.0)}, str(sdxl))
    fits = tmp_path / "fits.safetensors"  # the real DiT's sizes: 3072 wide
    save_file(
        {
            "double_blocks.0.img_attn.proj.lora_A.weight": torch.zeros(4, 3072),
            "double_blocks.0.img_attn.proj.lora_B.weight": torch.zeros(3072, 4),
        },
        str(fits),
    )

    def cli(*flags: str):
        """``generate.py`` in this process, real models asked for, none on this machine."""
        return cli_in_process(
            ["--prompt", "x", "--device", "cpu", *flags, "--models_dir", str(tmp_path / "models")]
        )

    refused = cli("--lora", str(sdxl))
    assert refused.returncode == 2 and "for a Stable Diffusion UNet" in refused.stderr
    assert "are missing" not in refused.stderr  # said before the weights were looked for
    accepted = cli("--lora", str(fits))  # passes the check, then meets the missing weights
    assert "weight file(s) are missing" in accepted.stderr and "LoRA" not in accepted.stderr
    speed = cli("--speed_lora", "FLUX.1-Turbo-Alpha")  # neither here nor fetchable: said first
    assert speed.returncode == 2 and "LoRA FLUX.1-Turbo-Alpha is not on this machine" in speed.stderr
    assert "python -m pulid.serve.download --speed_lora FLUX.1-Turbo-Alpha" in speed.stderr
