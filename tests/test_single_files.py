"""fp8 single-file DiTs and single-file text encoders (T5 safetensors/fp8/GGUF, CLIP-L), strictly.

Each file is written by the tests in the layout people have (Kijai's and ComfyUI's fp8 files,
ComfyUI's T5/CLIP files, city96's llama.cpp-named T5 GGUF), loaded through the product's loaders
and compared with an independent computation on the weights the file stands for.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from flux.checkpoint import CheckpointError
from flux.loading import load_flow_model, open_dit_file, single_file_format
from flux.model import Flux
from flux.quant import Fp8Linear, fp8_linear_names
from flux.quant.ggml import GGMLLinear
from flux.text_encoders import T5_GGUF_NAMES, load_clip, load_clip_file, load_t5, load_t5_file
from tests.numerics import fresh_seed, rel_err
from tests.reference_flux import flux_forward
from tests.tiny_configs import tiny_flux_params
from tests.tiny_models import random_inputs, random_model
from tiny_random.models import tiny_clip_tokenizer, tiny_t5_tokenizer, write_tiny_clip
from tiny_random.single_files import fp8_reference, fp8_state, gguf_reference, llama_cpp_t5_state, write_gguf

TOL_FORWARD = 1e-5  # float32 computation on exactly the file's weights vs float64 / float32 references


def tiny_dit_state(seed: int) -> tuple:
    params = tiny_flux_params()
    return params, random_model(params, torch.float32, seed).state_dict()


def load_single_dit(path, params):
    file = open_dit_file(path)
    return load_flow_model(file, params, "cpu", torch.float32, fmt=single_file_format(file, "cpu"))


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
def test_fp8_dit_file_loads_its_codes_into_fp8_layers(scaled, tmp_path):
    params, state = tiny_dit_state(fresh_seed())
    stored = fp8_state(state, scaled=scaled)  # every 2-D weight in fp8, embedders included
    path = tmp_path / "flux-fp8.safetensors"
    save_file(stored, path)
    model = load_single_dit(path, params)

    kept = set(fp8_linear_names(Flux(tiny_flux_params()).to("meta")))
    for name, layer in model.named_modules():
        if name in kept:
            assert isinstance(layer, Fp8Linear) and layer.backend == "dequantize"  # no fp8 units on CPU
            assert torch.equal(layer.weight.view(torch.uint8), stored[f"{name}.weight"].view(torch.uint8))
            expected_scale = stored[f"{name}.scale_weight"].item() if scaled else 1.0
            assert torch.all(layer.weight_scale == expected_scale)
    assert type(model.img_in) is nn.Linear  # outside the blocks: upcast once at load

    inputs = random_inputs(params, dtype=torch.float32, seed=fresh_seed())
    with torch.no_grad():
        out = model(**inputs)
    expected = flux_forward(fp8_reference(stored), params, **{k: v.double() for k, v in inputs.items()})
    assert rel_err(out, expected) < TOL_FORWARD


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_a_placed_fp8_file_is_no_longer_memory_mapped(tmp_path):
    """Under a memory placement the weights move to pinned copies; the file's memory map must go
    with the last tensor that used it, not stay mapped beside the copies (it did: 16 GiB)."""
    from flux.offload import ComponentOffload

    params, state = tiny_dit_state(fresh_seed())
    path = tmp_path / "flux-fp8-mapped.safetensors"
    save_file(fp8_state(state), path)

    def mapped() -> bool:
        return str(path) in Path("/proc/self/maps").read_text()

    model = load_single_dit(path, params)
    assert mapped()  # read through the memory map, not copied at load
    assert all(t._base is None for t in [*model.parameters(), *model.buffers()])
    offload = ComponentOffload("cpu")
    offload.add(model)  # packs every weight into one host buffer, as a placement does
    gc.collect()
    assert not mapped()
    offload.close()


def test_fp8_dit_file_on_fp8_hardware_uses_the_fp8_products(tmp_path, monkeypatch):
    """Where the GPU has fp8 units the layers keep the "auto" backend (scaled_mm)."""
    import flux.quant

    params, state = tiny_dit_state(0)
    path = tmp_path / "fp8.safetensors"
    save_file(fp8_state(state), path)
    monkeypatch.setattr(flux.quant, "fp8_matmul_supported", lambda device: True)
    file = open_dit_file(path)
    fmt = single_file_format(file, "cuda")
    assert fmt.backend == "auto"


def test_e5m2_dit_file_is_refused_with_the_reason(tmp_path):
    params, state = tiny_dit_state(0)
    stored = {k: (v.to(torch.float8_e5m2) if v.dim() == 2 else v) for k, v in state.items()}
    path = tmp_path / "flux-e5m2.safetensors"
    save_file(stored, path)
    with pytest.raises(CheckpointError, match="e5m2: use the e4m3fn file"):
        load_single_dit(path, params)


def test_fp8_file_whose_tensors_do_not_fit_names_them(tmp_path):
    params, state = tiny_dit_state(0)
    stored = fp8_state(state)
    stored["double_blocks.0.img_attn.qkv.weight"] = stored["double_blocks.0.img_attn.qkv.weight"][:-3]
    del stored["final_layer.linear.weight"]
    path = tmp_path / "broken-fp8.safetensors"
    save_file(stored, path)
    with pytest.raises(CheckpointError) as err:
        load_single_dit(path, params)
    assert "double_blocks.0.img_attn.qkv.weight" in str(err.value)
    assert "final_layer.linear.weight" in str(err.value)


def test_an_all_in_one_checkpoint_is_explained(tmp_path):
    params, state = tiny_dit_state(0)
    bundle = {f"model.diffusion_model.{k}": v for k, v in state.items()}
    bundle["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2, 2)
    path = tmp_path / "bundle.safetensors"
    save_file(bundle, path)
    with pytest.raises(CheckpointError, match="all-in-one checkpoint"):
        load_single_dit(path, params)


# ---------------------------------------------------------------- text encoders

# Widths that divide into 32-value GGUF blocks.
T5_FILE_CONFIG = dict(
    d_model=64,
    d_kv=16,
    d_ff=128,
    num_layers=2,
    num_heads=4,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=8,
)
PROMPTS = ["a photo of woman in snow", "portrait of man with color"]


@pytest.fixture(scope="module")
def t5_reference(tmp_path_factory):
    """A tiny T5 folder (the reference encoder) and its state."""
    from transformers import T5Config, T5EncoderModel

    folder = tmp_path_factory.mktemp("t5")
    tokenizer = tiny_t5_tokenizer()
    tokenizer.save_pretrained(folder)
    config = dict(T5_FILE_CONFIG, vocab_size=len(tokenizer))
    torch.manual_seed(fresh_seed())
    T5EncoderModel(T5Config(**config)).save_pretrained(folder)
    model = load_t5(folder, "cpu", torch.float32, max_length=16, expected=config)
    state = {k: v.clone() for k, v in model.hf_module.state_dict().items()}
    return folder, config, state


def t5_with_state(folder, config, state) -> torch.Tensor:
    """The folder's encoder with ``state`` in place of its weights, on the test prompts."""
    model = load_t5(folder, "cpu", torch.float32, max_length=16, expected=config)
    model.hf_module.load_state_dict({k: v.float() for k, v in state.items()})
    with torch.no_grad():
        return model(PROMPTS)


def encode(embedder) -> torch.Tensor:
    with torch.no_grad():
        return embedder(PROMPTS)


def test_t5_fp16_single_file_with_both_embedding_copies(t5_reference, tmp_path):
    folder, config, state = t5_reference
    path = tmp_path / "t5xxl_fp16.safetensors"
    save_file({k: v.half() for k, v in state.items()}, path)  # ComfyUI's file keeps both copies
    t5 = load_t5_file(path, folder, "cpu", torch.float32, max_length=16, expected=config)
    assert t5.hf_module.encoder.embed_tokens.weight is t5.hf_module.shared.weight
    expected = t5_with_state(folder, config, {k: v.half() for k, v in state.items()})
    assert rel_err(encode(t5), expected) < TOL_FORWARD


def test_t5_fp8_scaled_single_file_keeps_linears_in_fp8(t5_reference, tmp_path):
    folder, config, state = t5_reference
    linears = {
        k for k in state if k.endswith(".weight") and ("SelfAttention." in k or "DenseReluDense." in k)
    }
    linears -= {k for k in linears if "relative_attention_bias" in k}
    stored = fp8_state(
        {k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}, linears, scaled=True
    )
    path = tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    save_file(stored, path)
    t5 = load_t5_file(path, folder, "cpu", torch.float32, max_length=16, expected=config)
    layers = {n: m for n, m in t5.hf_module.named_modules() if isinstance(m, Fp8Linear)}
    assert {f"{n}.weight" for n in layers} == {k for k in linears if ".wo." not in k}  # see _t5_fp8_linears
    assert all(m.backend == "dequantize" for m in layers.values())
    reference = fp8_reference(stored)
    reference["encoder.embed_tokens.weight"] = reference["shared.weight"]
    out = encode(t5)
    assert rel_err(out, t5_with_state(folder, config, reference)) < TOL_FORWARD
    # what fp8 costs against the float encoder, on random weights (reported in BENCHMARKS.md at full size)
    assert rel_err(out, t5_with_state(folder, config, state)) < 0.1


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "Q4_1"])
def test_t5_gguf_with_llama_cpp_names(t5_reference, tmp_path, qtype):
    folder, config, state = t5_reference
    named = llama_cpp_t5_state(state)
    assert "enc.blk.0.attn_q.weight" in named and "token_embd.weight" in named
    types = {k: (qtype if v.dim() == 2 and "attn_rel_b" not in k else "F32") for k, v in named.items()}
    path = write_gguf(tmp_path / f"t5-{qtype}.gguf", named, types, architecture="t5encoder")
    t5 = load_t5_file(path, folder, "cpu", torch.float32, max_length=16, expected=config)
    quantised = [m for m in t5.hf_module.modules() if isinstance(m, GGMLLinear)]
    assert len(quantised) == 2 * 7 and {m.qtype for m in quantised} == {qtype}
    assert t5.hf_module.shared.weight.dtype == torch.float32  # the embedding table, dequantised at load
    reference = {}
    for key, value in gguf_reference(path).items():
        for old, new in T5_GGUF_NAMES:
            key = key.replace(old, new)
        reference[key] = value
    reference["encoder.embed_tokens.weight"] = reference["shared.weight"]
    out = encode(t5)
    assert rel_err(out, t5_with_state(folder, config, reference)) < TOL_FORWARD
    # The file holds the float weights up to the format's own rounding: a stable bound per weight
    # (each error is an average over thousands of values; measured 0.0055, 0.044 and 0.080 at most).
    # Through a tiny random T5 the output's error is not stable enough to bound.
    bound = {"Q8_0": 0.008, "Q5_0": 0.055, "Q4_1": 0.1}[qtype]
    stored = gguf_reference(path)
    for key, kind in types.items():
        if kind == qtype:
            assert rel_err(stored[key], named[key]) < bound, key


def test_t5_files_of_other_models_are_refused(t5_reference, tmp_path):
    folder, config, state = t5_reference
    llm = write_gguf(
        tmp_path / "llm.gguf",
        {"token_embd.weight": torch.zeros(8, 32)},
        {"token_embd.weight": "F16"},
        "llama",
    )
    with pytest.raises(CheckpointError, match="'llama' model, not the T5-XXL text encoder"):
        load_t5_file(llm, folder, expected=config)
    whole = dict(state, **{"decoder.final_layer_norm.weight": torch.ones(64)})
    path = tmp_path / "t5-whole.safetensors"
    save_file(whole, path)
    with pytest.raises(CheckpointError, match="decoder.final_layer_norm.weight(.|\n)*encoder-only"):
        load_t5_file(path, folder, expected=config)


def test_clip_l_single_file_in_comfy_layout(tmp_path):
    from tiny_random.models import TINY_CLIP_CONFIG

    folder = write_tiny_clip(tmp_path / "clip", seed=fresh_seed())
    config = dict(TINY_CLIP_CONFIG, vocab_size=len(tiny_clip_tokenizer()), bos_token_id=0, eos_token_id=1)
    reference = load_clip(folder, "cpu", torch.float32, expected=TINY_CLIP_CONFIG)
    state = reference.hf_module.state_dict()
    stored = {
        (k if k.startswith("text_model.") else f"text_model.{k}"): v.half().clone() for k, v in state.items()
    }
    stored["text_projection.weight"] = torch.zeros(8, config["hidden_size"], dtype=torch.float16)
    stored["logit_scale"] = torch.tensor(4.6)
    stored["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    path = tmp_path / "clip_l.safetensors"
    save_file(stored, path)
    clip = load_clip_file(path, folder, "cpu", torch.float32, expected=config)
    reference.hf_module.load_state_dict({k: v.half().float() for k, v in state.items()})
    assert rel_err(encode(clip), encode(reference)) < TOL_FORWARD
    del stored["text_model.final_layer_norm.weight"]
    save_file(stored, path)
    with pytest.raises(CheckpointError, match="final_layer_norm.weight"):
        load_clip_file(path, folder, expected=config)


# ---------------------------------------------------------------- choosing the files


SMALL_CARD = {"dit": "flux-dev-Q4_K_S", "t5": "t5xxl-Q5_K_M", "clip": "clip-l"}


def test_single_files_replace_the_official_ones_in_the_missing_report(tmp_path, monkeypatch):
    from flux.hub import WeightsNotFoundError
    from pulid.loading import PipelineConfig, load_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as err:
        load_pipeline(PipelineConfig("flux-dev", "v0.9.1", "cpu", models_dir=tmp_path, **SMALL_CARD))
    message = str(err.value)
    for name in ("flux1-dev-Q4_K_S.gguf", "t5-v1_1-xxl-encoder-Q5_K_M.gguf", "clip_l.safetensors"):
        assert str(tmp_path / name) in message
    assert str(tmp_path / "t5-tokenizer") in message and str(tmp_path / "clip-tokenizer") in message
    assert "flux1-dev.safetensors" not in message and str(tmp_path / "xflux_text_encoders") not in message
    assert "--dit flux-dev-Q4_K_S --t5 t5xxl-Q5_K_M --clip clip-l" in message


def test_a_given_path_is_used_and_a_missing_one_is_named(tmp_path, monkeypatch):
    from flux.hub import WeightsNotFoundError
    from pulid.loading import PipelineConfig, load_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="mine.gguf is not a file"):
        load_pipeline(
            PipelineConfig("flux-dev", "v0.9.1", "cpu", models_dir=tmp_path, dit=str(tmp_path / "mine.gguf"))
        )


@pytest.mark.parametrize(
    "flags,message",
    [
        (dict(fp8="native", dit="flux-dev-Q8_0"), "pass one of them"),
        (dict(dit="flux-dev-Q3"), "neither one of flux-dev-fp8, flux-dev-Q8_0"),
        (dict(t5="t5.bin"), "neither one of t5xxl-fp16"),
        (dict(model="flux-krea-dev", dit="flux-dev-Q8_0"), "is a FLUX.1-dev file"),
    ],
)
def test_choices_that_cannot_work_are_refused_with_the_reason(flags, message):
    from pulid.catalogue import WeightChoiceError, required_weights

    flags = dict(flags)
    model, fp8 = flags.pop("model", "flux-dev"), flags.pop("fp8", None)
    with pytest.raises(WeightChoiceError, match=message):
        required_weights(model, "v0.9.1", fp8, flags)


def test_the_start_prints_a_bad_choice_without_a_traceback(tmp_path):
    import argparse

    from pulid.serve.startup import add_model_arguments, load_or_exit

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    args = parser.parse_args(
        ["--fp8", "--fp8_mode", "quanto", "--dit", "flux-dev-Q8_0", "--models_dir", str(tmp_path)]
    )
    with pytest.raises(SystemExit, match="Cannot start: --fp8 quantises"):
        load_or_exit(args)


def test_download_fetches_the_chosen_single_files_and_tokenizers(tmp_path):
    import io
    from contextlib import redirect_stdout

    from pulid.serve.download import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert (
            main(["--dry-run", "--models_dir", str(tmp_path), *[f"--{k}={v}" for k, v in SMALL_CARD.items()]])
            == 0
        )
    text = out.getvalue()
    for name in (
        "flux1-dev-Q4_K_S.gguf",
        "t5-v1_1-xxl-encoder-Q5_K_M.gguf",
        "clip_l.safetensors",
        "t5-tokenizer",
    ):
        assert str(tmp_path / name) in text
    assert "flux1-dev.safetensors" not in text


def test_the_memory_plan_sees_the_stored_size_of_a_single_file(tmp_path):
    """Planning prepares the meta model from the file's header as the loader does: same bytes."""
    from flux.loading import build_flow_model
    from flux.offload.layout import tensor_bytes
    from tiny_random.single_files import city96_types

    params = tiny_flux_params(hidden_size=256, num_heads=2, axes_dim=[16, 56, 56])
    torch.manual_seed(0)
    state = Flux(params).state_dict()
    for qtype in ("Q4_K", "Q8_0"):
        path = write_gguf(tmp_path / f"{qtype}.gguf", state, city96_types(state, qtype))
        file = open_dit_file(path)
        planned = build_flow_model(params, "meta", torch.bfloat16)
        single_file_format(file, "meta").prepare(planned, file.header)
        loaded = load_flow_model(
            open_dit_file(path), params, "cpu", torch.bfloat16, fmt=single_file_format(file, "cpu")
        )
        assert tensor_bytes([planned]) == tensor_bytes([loaded])
        # smaller than bf16 even at this size, where the F16/F32 embedders and norms weigh a lot
        bf16_bytes = tensor_bytes([build_flow_model(params, "meta", torch.bfloat16)])
        assert tensor_bytes([loaded]) < 0.75 * bf16_bytes
