"""GPU-only checks of the offload code (run on a CUDA machine: ``python -m pytest tests_gpu``).

The CPU suite (``tests/test_offload.py``) runs the same scheduling code through a synchronous
transfer; these check the CUDA side stream, events and page-locked memory for real.
"""

import pytest
import torch

from flux.offload import ComponentOffload, StreamedBlocks, measure
from flux.repeated import block_modules
from tests.offload_helpers import (
    NO_RESERVES,
    PARAMS,
    generation_requests,
    injection,
    small_component,
    tiny_plans,
    tiny_setup,
)
from tests.tiny_models import random_model

if not torch.cuda.is_available():
    pytest.skip("these checks need a CUDA device", allow_module_level=True)


@pytest.mark.parametrize("pin", ["register", "allocator"])
def test_cuda_streaming_matches_resident_model_and_counts_device_bytes(pin):
    from flux.offload import CudaTransfer

    model, inputs = tiny_setup()
    cas, id_injection = injection()
    inputs = {k: v.cuda() for k, v in inputs.items()}
    id_injection.cross_attentions = cas.cuda()
    id_injection.id_tokens = id_injection.id_tokens.cuda()
    resident_model = random_model(PARAMS, torch.float32).cuda()
    with torch.no_grad():
        expected = [resident_model(**inputs), resident_model(**inputs, id_injection=id_injection)]
        del resident_model
        for name, module in model.named_children():  # the blocks stay on the host, the rest moves
            if name not in ("double_blocks", "single_blocks"):
                module.cuda()
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        transfer = CudaTransfer("cuda", pin)
        streamer = StreamedBlocks(block_modules(model), "cuda", 10**9, transfer=transfer, resident=[0, 3])
        torch.cuda.synchronize()
        buffers = len(streamer.resident) + streamer.num_slots  # the allocator rounds each up to 512 B
        allocated = torch.cuda.memory_allocated() - baseline
        assert streamer.device_bytes <= allocated < streamer.device_bytes + 512 * buffers
        for _ in range(3):
            assert torch.equal(model(**inputs), expected[0])
            assert torch.equal(model(**inputs, id_injection=id_injection), expected[1])
        streamer.close()
        assert all(p.device.type == "cpu" for b in block_modules(model) for p in b.parameters())
        assert torch.cuda.memory_allocated() == baseline


def test_cuda_component_offload_frees_device_memory_after_use():
    a, b = small_component(0), small_component(1)
    x = torch.randn(3, 8, device="cuda")
    with torch.no_grad():
        expected = [a.cuda()(x), b.cuda()(x)]
        a.cpu(), b.cpu()
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        offload = ComponentOffload("cuda")
        for _ in range(2):
            with offload.on_device(a):
                offload.prefetch(b)
                assert torch.equal(a(x), expected[0])
            with offload.on_device(b):
                assert torch.equal(b(x), expected[1])
            assert torch.cuda.memory_allocated() == baseline
        offload.close()
        assert all(p.device.type == "cpu" for p in [*a.parameters(), *b.parameters()])


def test_cuda_pipeline_placements_all_give_the_resident_images(tmp_path):
    pytest.importorskip("timm")
    from flux.offload import PipelinePlacement
    from tests.stubs import StubFaceAnalyzer
    from tiny_random.pipeline import tiny_pipeline

    pipe = tiny_pipeline(tmp_path, StubFaceAnalyzer())  # built on the host, run on the GPU
    pipe.device = pipe.id_encoder.device = torch.device("cuda")
    components = pipe.components()
    plans = tiny_plans(measure(components))
    baseline = torch.cuda.memory_allocated()
    results = {}
    for which in ["resident", "all-streamed", "partly-resident", "offload-flag"]:
        pipe.id_encoder._cache.clear()
        with PipelinePlacement(components, NO_RESERVES, plans[which], "cuda").attach() as placement:
            results[which] = [pipe.generate(r).latents for r in generation_requests()]
            assert placement.log == ["text", "id", "denoise", "decode", "text", "denoise", "decode"]
        pipe.id_encoder._uncond = None  # made on the GPU with the first placement's weights
        torch.cuda.synchronize()
        assert all(p.device.type == "cpu" for p in pipe.dit.parameters())
    for which, latents in results.items():
        assert all(torch.equal(a, b) for a, b in zip(latents, results["resident"], strict=True)), which
    del results
    assert torch.cuda.memory_allocated() - baseline < 2**20  # only the ID cache's small tensors remain
