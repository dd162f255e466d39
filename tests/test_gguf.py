"""GGUF DiT files (city96's layout): dequantisation against the gguf package, the loader, bad files.

Tiny DiTs are written through the ``gguf`` package's writer, loaded through the real loader
(:func:`flux.loading.open_dit_file` + :func:`flux.loading.single_file_format`) and compared with
the independent float64 reference forward (tests/reference_flux.py) on the weights the ``gguf``
package's own numpy code dequantises from the same file.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from torch import nn

from flux.checkpoint import CheckpointError
from flux.gguf_file import GGUFFile
from flux.loading import load_flow_model, open_dit_file, single_file_format
from flux.model import Flux
from flux.quant.ggml import FORMATS, GGMLLinear, dequantize
from tests.numerics import fresh_seed, rel_err
from tests.reference_flux import flux_forward
from tests.tiny_configs import tiny_flux_params
from tests.tiny_models import random_inputs, random_model
from tiny_random.ggml_quant import quantize
from tiny_random.single_files import city96_types, gguf_reference, write_gguf

# Rows of 256 so that the K formats apply to every block Linear (head dim 128 = 16 + 56 + 56).
K_PARAMS = dict(hidden_size=256, num_heads=2, axes_dim=[16, 56, 56])
# A float32 forward on exactly the dequantised weights, against the float64 reference.
TOL_FORWARD = 1e-5
# Plain-rule quantisation of Gaussian weights (tiny_random.ggml_quant), relative error bounds:
# about 2x the measured values, so a wrong scale or bit layout (errors of order 1) cannot pass.
QUANT_ERROR_BOUND = {
    "Q8_0": 0.012,
    "Q6_K": 0.04,
    "Q5_K": 0.08,
    "Q5_0": 0.09,
    "Q5_1": 0.08,
    "Q4_K": 0.16,
    "Q4_0": 0.17,
    "Q4_1": 0.16,
}


def random_blocks(qtype: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """Random bytes for ``n`` blocks, with every float16 scale field set to a finite random value."""
    import gguf

    fmt = FORMATS[qtype]
    blocks = torch.randint(0, 256, (n, fmt.type_size), dtype=torch.uint8, generator=generator)
    # byte offsets of the float16 fields in each format's block
    fields = {"Q6_K": (208,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q4_1": (0, 2), "Q5_1": (0, 2)}
    for start in fields.get(qtype, (0,)):
        values = (torch.rand(n, generator=generator) * 0.2 - 0.1).to(torch.float16)
        blocks[:, start : start + 2] = values.view(torch.uint8).reshape(n, 2)
    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]] == (fmt.block_size, fmt.type_size)
    return blocks


@pytest.mark.parametrize("qtype", sorted(FORMATS))
def test_dequantisation_equals_the_gguf_package_on_random_blocks(qtype):
    import gguf

    generator = torch.Generator().manual_seed(fresh_seed())
    blocks = random_blocks(qtype, 96, generator)
    reference = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[qtype])
    ours = dequantize(blocks, qtype, (96, FORMATS[qtype].block_size))
    assert np.isfinite(reference).all()
    # Integers times float16 scales are exact in float32: the same bits as numpy's float32 result.
    assert torch.equal(ours, torch.from_numpy(np.asarray(reference, dtype=np.float32)).reshape(ours.shape))


@pytest.mark.parametrize("qtype", sorted(FORMATS))
def test_test_quantiser_writes_what_the_gguf_package_reads(qtype):
    import gguf

    weight = torch.randn(16, 512, generator=torch.Generator().manual_seed(fresh_seed())) * 0.05
    packed = quantize(weight, qtype)
    back = gguf.quants.dequantize(packed.numpy(), gguf.GGMLQuantizationType[qtype]).reshape(16, 512)
    assert rel_err(torch.from_numpy(back), weight) < QUANT_ERROR_BOUND[qtype]


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q6_K"])
def test_ggml_linear_is_a_linear_on_the_dequantised_weight(qtype):
    generator = torch.Generator().manual_seed(fresh_seed())
    weight = torch.randn(24, 256, generator=generator) * 0.05
    layer = GGMLLinear(256, 24, qtype, dtype=torch.float32)
    layer.weight.copy_(quantize(weight, qtype))
    layer.bias.copy_(torch.randn(24, generator=generator))
    x = torch.randn(3, 5, 256, generator=generator)
    w64 = dequantize(layer.weight, qtype, (24, 256), torch.float64)
    reference = x.double() @ w64.t() + layer.bias.double()
    assert rel_err(layer(x), reference) < TOL_FORWARD
    assert layer.to(torch.bfloat16).weight.dtype == torch.int8  # casting the model leaves the bytes


def tiny_state(params, seed: int) -> dict[str, torch.Tensor]:
    return random_model(params, torch.float32, seed).state_dict()


def mixed_types(state) -> dict[str, str]:
    """city96's assignment, with the block Linears cycling through every supported format."""
    types = city96_types(state, "Q8_0")
    cycle = sorted(FORMATS)
    quantised = [k for k, t in types.items() if t == "Q8_0"]
    for i, key in enumerate(quantised):
        types[key] = cycle[i % len(cycle)]
    return types


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    params = tiny_flux_params(**K_PARAMS)
    state = tiny_state(params, fresh_seed())
    types = mixed_types(state)
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-flux.gguf", state, types)
    return params, state, types, path


def load_gguf_dit(path, params, dtype=torch.float32) -> Flux:
    file = open_dit_file(path)
    return load_flow_model(file, params, "cpu", dtype, fmt=single_file_format(file, "cpu"))


def test_a_mixed_gguf_dit_loads_quantised_and_matches_the_float64_reference(tiny_gguf):
    params, _, types, path = tiny_gguf
    assert set(types.values()) >= set(FORMATS) | {"F16", "F32"}
    model = load_gguf_dit(path, params)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, GGMLLinear)}
    assert {f"{name}.weight" for name in layers} == {k for k, t in types.items() if t in FORMATS}
    assert {m.qtype for m in layers.values()} == set(FORMATS)
    assert all(m.weight.dtype == torch.int8 for m in layers.values())
    # the bytes held are the file's bytes: the quantised size, not the float one
    file_bytes = sum(m.weight.numel() for m in layers.values())
    float_bytes = sum(m.in_features * m.out_features * 4 for m in layers.values())
    assert file_bytes < float_bytes / 3

    reference_state = gguf_reference(path)
    inputs = random_inputs(params, dtype=torch.float32, seed=fresh_seed())
    with torch.no_grad():
        out = model(**inputs)
    expected = flux_forward(reference_state, params, **{k: v.double() for k, v in inputs.items()})
    assert rel_err(out, expected) < TOL_FORWARD


def test_gguf_dit_close_to_the_float_model_for_q8(tmp_path):
    params = tiny_flux_params(**K_PARAMS)
    state = tiny_state(params, fresh_seed())
    path = write_gguf(tmp_path / "q8.gguf", state, city96_types(state, "Q8_0"))
    model = load_gguf_dit(path, params)
    inputs = random_inputs(params, dtype=torch.float32, seed=fresh_seed())
    with torch.no_grad():
        out = model(**inputs)
    expected = flux_forward({k: v.double() for k, v in state.items()}, params, **inputs)
    assert rel_err(out, expected) < 0.02  # Q8_0 is near lossless


def test_bf16_tensors_and_a_comfy_prefix_are_read(tmp_path):
    params = tiny_flux_params(**K_PARAMS)
    state = tiny_state(params, fresh_seed())
    types = {k: ("BF16" if t == "F16" else t) for k, t in city96_types(state, "Q5_K").items()}
    prefixed = {f"model.diffusion_model.{k}": v for k, v in state.items()}
    path = write_gguf(
        tmp_path / "bf16.gguf", prefixed, {f"model.diffusion_model.{k}": t for k, t in types.items()}
    )
    model = load_gguf_dit(path, params)
    reference = {k.removeprefix("model.diffusion_model."): v for k, v in gguf_reference(path).items()}
    inputs = random_inputs(params, dtype=torch.float32, seed=fresh_seed())
    with torch.no_grad():
        out = model(**inputs)
    assert rel_err(out, flux_forward(reference, params, **inputs)) < TOL_FORWARD


def test_gguf_layers_compile_without_graph_breaks():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    layers = nn.Sequential(GGMLLinear(256, 64, "Q4_K", dtype=torch.float32), nn.GELU())
    layers[0].weight.copy_(quantize(torch.randn(64, 256) * 0.05, "Q4_K"))
    x = torch.randn(4, 256)
    compiled = torch.compile(layers, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(x), layers(x))
    assert sum(counters["graph_break"].values()) == 0


def test_gguf_dit_streams_its_quantised_bytes_under_a_budget(tiny_gguf):
    """The memory placement moves the GGML layers' bytes like any weights: same output streamed,
    and what crosses per streamed block is its quantised size."""
    from flux.offload import StreamedBlocks
    from flux.offload.layout import FlatLayout
    from flux.repeated import block_modules
    from tests.offload_helpers import LoggingTransfer

    params, _, _, path = tiny_gguf
    model = load_gguf_dit(path, params)
    inputs = random_inputs(params, dtype=torch.float32, seed=fresh_seed())
    with torch.no_grad():
        resident = model(**inputs)
    blocks = block_modules(model)
    transfer = LoggingTransfer()
    with StreamedBlocks(blocks, "cpu", 10**9, num_slots=2, transfer=transfer, resident=[0]), torch.no_grad():
        streamed = model(**inputs)
    assert torch.equal(streamed, resident)
    assert len(transfer.copies()) >= len(blocks) - 1
    sizes = [FlatLayout(b).nbytes for b in blocks]
    float_sizes = [
        sum(p.numel() * 4 for p in b.parameters())
        + sum(m.in_features * m.out_features * 4 for m in b.modules() if isinstance(m, GGMLLinear))
        for b in blocks
    ]
    assert all(size < float_size / 3 for size, float_size in zip(sizes, float_sizes, strict=True))


# ---------------------------------------------------------------- bad files


def test_truncated_gguf_is_refused_naming_the_file(tiny_gguf, tmp_path):
    *_, path = tiny_gguf
    data = path.read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 40, 10):
        broken = tmp_path / f"cut{cut}.gguf"
        broken.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="cut") as err:
            open_dit_file(broken)
        assert "truncated" in str(err.value) or "corrupt" in str(err.value) or "not a GGUF" in str(err.value)


def test_hostile_gguf_headers_are_refused(tiny_gguf, tmp_path):
    *_, path = tiny_gguf
    data = bytearray(path.read_bytes())
    huge_counts = tmp_path / "counts.gguf"
    huge_counts.write_bytes(bytes(data[:8]) + struct.pack("<QQ", 2**62, 2**40) + bytes(data[24:]))
    with pytest.raises(CheckpointError, match="cannot fit"):
        open_dit_file(huge_counts)
    version = tmp_path / "version.gguf"
    version.write_bytes(bytes(data[:4]) + struct.pack("<I", 99) + bytes(data[8:]))
    with pytest.raises(CheckpointError, match="version 99"):
        open_dit_file(version)
    # the first metadata key's length (just after the 24-byte preamble) made enormous
    long_key = tmp_path / "key.gguf"
    long_key.write_bytes(bytes(data[:24]) + struct.pack("<Q", 2**60) + bytes(data[32:]))
    with pytest.raises(CheckpointError, match="key.gguf"):
        open_dit_file(long_key)


def test_tensor_data_past_the_end_is_refused(tmp_path):
    params = tiny_flux_params(**K_PARAMS)
    state = tiny_state(params, 0)
    path = write_gguf(tmp_path / "short.gguf", state, city96_types(state, "Q8_0"))
    data = path.read_bytes()
    path.write_bytes(data[:-64])
    with pytest.raises(CheckpointError, match="short.gguf .*truncated"):
        GGUFFile(path)


def test_unsupported_quantisation_types_are_named(tmp_path):
    import gguf

    path = tmp_path / "q2k.gguf"
    writer = gguf.GGUFWriter(str(path), "flux")
    writer.add_tensor(
        "double_blocks.0.img_attn.qkv.weight",
        np.zeros((4, 84), np.uint8),
        raw_dtype=gguf.GGMLQuantizationType.Q2_K,
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"double_blocks\.0\.img_attn\.qkv\.weight \(Q2_K\)"):
        open_dit_file(path)


@pytest.mark.parametrize("architecture", ["sdxl", "llama", "flux2"])
def test_gguf_of_another_architecture_is_refused(architecture, tmp_path):
    state = {"a.weight": torch.zeros(4, 32)}
    path = write_gguf(
        tmp_path / f"{architecture}.gguf", state, {"a.weight": "Q8_0"}, architecture=architecture
    )
    with pytest.raises(CheckpointError, match=f"'{architecture}' model, not the FLUX.1 transformer"):
        open_dit_file(path)


def test_gguf_with_a_missing_or_misshaped_tensor_names_it(tiny_gguf, tmp_path):
    params, state, types, _ = tiny_gguf
    edited = dict(state)
    del edited["double_blocks.1.img_mlp.0.weight"]
    edited["single_blocks.0.linear2.weight"] = torch.zeros(256, 512)
    path = write_gguf(tmp_path / "edited.gguf", edited, types)
    with pytest.raises(CheckpointError) as err:
        load_gguf_dit(path, params)
    message = str(err.value)
    assert "double_blocks.1.img_mlp.0.weight" in message and "single_blocks.0.linear2.weight" in message
    assert "edited.gguf" in message


def test_gguf_format_keeps_float_linears_as_they_are(tiny_gguf):
    """A Linear stored in F16 (the embedders) stays an nn.Linear in the model's dtype."""
    params, _, _, path = tiny_gguf
    model = load_gguf_dit(path, params, torch.bfloat16)
    assert type(model.img_in) is nn.Linear and model.img_in.weight.dtype == torch.bfloat16


def hostile_gguf(path, kvs: bytes, n_kv: int, n_tensors: int = 0, size: int | None = None):
    """A GGUF v3 preamble followed by ``kvs`` (raw metadata and tensor-info bytes), padded to ``size``."""
    data = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs
    path.write_bytes(data.ljust(size or len(data), b"\0"))
    return path


def gguf_string(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


@pytest.fixture
def hang_guard():
    """Fails the test, rather than the suite hanging, if a load loops (the defect these tests pin)."""
    import signal

    def expire(*_):
        raise TimeoutError("the loader was still reading after 60 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_metadata_array_longer_than_the_file_is_refused_at_once(tmp_path, hang_guard):
    # 249 bytes declaring a 2**40-item array: gguf's reader looped past the end with memory growing.
    array = gguf_string("general.architecture") + struct.pack("<IIQ", 9, 4, 2**40)
    path = hostile_gguf(tmp_path / "tiny.gguf", array, n_kv=1, size=249)
    assert path.stat().st_size == 249
    with pytest.raises(CheckpointError, match=r"tiny.gguf is truncated or corrupt: metadata entry 0 \("):
        open_dit_file(path)
    from flux.text_encoders import open_t5_file  # the --t5 door opens the same way

    with pytest.raises(CheckpointError, match="1099511627776 items"):
        open_t5_file(path)
    strings = gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2**40)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        open_dit_file(hostile_gguf(tmp_path / "strings.gguf", strings, n_kv=1, size=249))
    long_string = gguf_string("general.name") + struct.pack("<IQ", 8, 2**50)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        open_dit_file(hostile_gguf(tmp_path / "string.gguf", long_string, n_kv=1, size=249))


def test_more_tensors_than_any_model_has_are_refused_before_parsing(tmp_path, hang_guard):
    from flux.gguf_file import MAX_TENSORS

    # 50,000 one-element tensor entries in 3.5 MB: the reader took 41 s and 266 MiB before any check.
    entry = gguf_string("t") + struct.pack("<IQIQ", 1, 1, 0, 0)
    count = MAX_TENSORS + 1
    path = hostile_gguf(tmp_path / "many.gguf", entry * count, n_kv=0, n_tensors=count)
    with pytest.raises(CheckpointError, match=f"many.gguf claims {count} tensors .* at most {MAX_TENSORS}"):
        open_dit_file(path)
    dims = gguf_string("t") + struct.pack("<I", 9) + b"\0" * 100
    with pytest.raises(CheckpointError, match="tensor 0 claims 9 dimensions"):
        open_dit_file(hostile_gguf(tmp_path / "dims.gguf", dims, n_kv=0, n_tensors=1))


def test_the_layout_scan_passes_real_arrays_and_strings(tmp_path):
    import gguf

    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(str(path), "t5encoder")
    writer.add_array("tokenizer.ggml.tokens", ["▁a", "bc", "", "ünï"] * 500)  # T5 files carry a vocabulary
    writer.add_array("tokenizer.ggml.scores", [0.5, -1.0] * 1000)
    writer.add_array("nested", [[1, 2], [3]])
    writer.add_string("general.name", "t5")
    writer.add_tensor("token_embd.weight", np.ones((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with GGUFFile(path) as file:
        assert file.architecture == "t5encoder" and file.header == {"token_embd.weight": ((4, 32), "F32")}
