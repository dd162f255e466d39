"""Memory placement: streamed DiT blocks, whole-component offload and the VRAM budget plan.

The CPU tests drive the real scheduling code through an instrumented synchronous transfer: its
"device" buffers are separate CPU allocations, it logs every copy, event and wait, and in lazy
mode it holds copies back until something waits for them (as a CUDA copy stream would), so a
missing wait shows up as wrong numbers. The CUDA tests at the end run where a GPU is present.
"""

import functools
import itertools

import pytest
import torch
from torch import nn

from flux.loading import build_flow_model
from flux.offload import (
    BudgetError,
    ComponentOffload,
    DeviceLedger,
    MemoryPolicy,
    Stage,
    StreamedBlocks,
    choose_resident,
    evaluate_plan,
    measure,
    minimum_capacity,
    plan_memory,
)
from flux.offload.layout import FlatLayout
from flux.offload.plan import DEFAULT_OVERHEAD
from flux.registry import MODELS
from flux.repeated import block_modules
from pulid.catalogue import FLUX_DIT_BYTES
from pulid.loading import meta_pipeline, plan_counts
from pulid.pipeline import STAGES
from tests.offload_helpers import (
    NO_RESERVES,
    LoggingTransfer,
    generation_requests,
    injection,
    small_component,
    tiny_plans,
    tiny_setup,
)

GiB = 1024**3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models gain nothing from threads, and a shared CI CPU makes them much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def log_compute(blocks, log):
    """Hooks registered after the streamer's: they run right before and after each block's forward."""
    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=index: log.append(("compute", i))))
    return handles


def block_sizes(model):
    return [FlatLayout(b).nbytes for b in block_modules(model)]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- StreamedBlocks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("lazy", [False, True], ids=["eager-copies", "lazy-copies"])
@pytest.mark.parametrize(
    "num_slots,resident",
    [(2, [0, 3]), (2, []), (3, [1]), (1, [0, 1])],
    ids=["2slots-interleaved", "2slots-all-streamed", "3slots", "1slot"],
)
def test_streamed_model_matches_resident_model_exactly(lazy, num_slots, resident):
    model, inputs = tiny_setup()
    cas, id_injection = injection()
    with torch.no_grad():
        expected = model(**inputs)
        expected_id = model(**inputs, id_injection=id_injection)
        transfer = LoggingTransfer(lazy=lazy)
        streamer = StreamedBlocks(
            block_modules(model), "cpu", 10**9, num_slots=num_slots, transfer=transfer, resident=resident
        )
        with streamer:
            for _ in range(3):  # denoising steps; the ID pass stands in for the CFG negative pass
                assert torch.equal(model(**inputs), expected)
                assert torch.equal(model(**inputs, id_injection=id_injection), expected_id)
    assert not torch.equal(expected, expected_id)  # the injection really took part
    # each streamed block once per pass, plus the num_slots - 1 copies already issued for a 7th pass
    assert len(transfer.copies()) == 6 * (7 - len(resident)) + num_slots - 1


def test_prefetch_order_and_stream_events_over_passes():
    model, inputs = tiny_setup()
    transfer = LoggingTransfer()
    blocks = block_modules(model)
    resident = [0, 3]
    with torch.no_grad(), StreamedBlocks(blocks, "cpu", 10**9, transfer=transfer, resident=resident):
        handles = log_compute(blocks, transfer.log)
        for _ in range(3):
            model(**inputs)
        for handle in handles:
            handle.remove()
        log = list(transfer.log)

    streamed = [1, 2, 4, 5, 6]
    # the first pass's first copy is issued at construction, after the slots' allocation point
    expected = [("record", "slots"), ("copy", 1, "slots")]
    for step in range(3):
        for index in range(7):
            if index in resident:
                expected.append(("compute", index))
                continue
            j = streamed.index(index)
            after = "slots" if (step, j) == (0, 0) else streamed[j - 1]  # slot freed by the block before
            expected += [
                ("copy", streamed[(j + 1) % 5], after),  # prefetch, wrapping to the next pass
                ("wait", index),
                ("compute", index),
                ("record", index),
            ]
    assert log == expected


def test_slots_made_again_after_a_suspend_are_written_only_after_their_allocation():
    """On CUDA a fresh slot may reuse memory that queued kernels still read: no copy may skip the
    event recorded after the allocation (the bug that made streamed images differ, seen on an H200)."""
    model, inputs = tiny_setup()
    transfer = LoggingTransfer(lazy=True)
    with (
        torch.no_grad(),
        StreamedBlocks(block_modules(model), "cpu", 10**9, transfer=transfer, resident=[0]) as s,
    ):
        expected = model(**inputs)
        for _ in range(2):
            s.suspend()
            transfer.log.clear()
            assert torch.equal(model(**inputs), expected)
            copies = [entry for entry in transfer.log if entry[0] == "copy"]
            assert transfer.log[0] == ("record", "slots") and copies[0][2] == "slots"
            assert all(after is not None for _, _, after in copies)


def test_streamed_blocks_read_slots_during_forward_and_host_copies_otherwise():
    model, inputs = tiny_setup()
    blocks = block_modules(model)
    transfer = LoggingTransfer()
    seen = []

    def where(block_index):
        ptr = next(blocks[block_index].parameters()).untyped_storage().data_ptr()
        if any(ptr == b.untyped_storage().data_ptr() for b in streamer.slot_buffers()):
            return "slot"
        if block_index in streamer.resident:
            return "resident" if ptr == streamer.resident_buffer(block_index).data_ptr() else "?"
        return "home" if ptr == streamer.home_buffer(block_index).data_ptr() else "?"

    streamer = StreamedBlocks(blocks, "cpu", 10**9, transfer=transfer, resident=[0, 3])
    with streamer, torch.no_grad():
        handles = [
            b.register_forward_pre_hook(lambda m, a, i=i: seen.append(where(i))) for i, b in enumerate(blocks)
        ]
        model(**inputs)
        assert seen == ["resident", "slot", "slot", "resident", "slot", "slot", "slot"]
        assert [where(i) for i in range(7)] == [
            "resident",
            "home",
            "home",
            "resident",
            "home",
            "home",
            "home",
        ]
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("num_slots", [2, 3])
def test_blocks_called_in_any_order_still_get_their_own_weights(num_slots):
    """The hooks never rely on the predicted order: a block run out of turn loads itself and its
    prefetches never evict it (with eager copies an eviction would overwrite it at once)."""
    model, inputs = tiny_setup()
    blocks = block_modules(model)
    calls = {}

    def capture(module, args, kwargs, output, i):
        calls[i] = (args, kwargs, output)

    with torch.no_grad():
        handles = [
            b.register_forward_hook(functools.partial(capture, i=i), with_kwargs=True)
            for i, b in enumerate(blocks)
        ]
        model(**inputs)
        for handle in handles:
            handle.remove()
        order = torch.randint(0, 7, (150,), generator=torch.Generator().manual_seed(num_slots)).tolist()
        with StreamedBlocks(
            blocks, "cpu", 10**9, num_slots=num_slots, transfer=LoggingTransfer(), resident=[3]
        ):
            for i in order:
                args, kwargs, output = calls[i]
                result = blocks[i](*args, **kwargs)  # double blocks return (img, txt)
                assert all(map(torch.equal, *(tuple(x) if i < 2 else (x,) for x in (result, output))))


def test_budget_is_respected_as_counted_bytes():
    model, inputs = tiny_setup()
    sizes = block_sizes(model)
    reserve = 12_345
    for spare in [0, sizes[-1], 2 * sizes[0], sum(sizes)]:
        budget = reserve + minimum_capacity(sizes) + spare
        ledger = DeviceLedger(limit=budget - reserve)  # allocating past it raises
        with (
            torch.no_grad(),
            StreamedBlocks(
                block_modules(model), "cpu", budget, reserve, transfer=LoggingTransfer(), ledger=ledger
            ) as streamer,
        ):
            for _ in range(2):
                model(**inputs)
            planned = streamer.resident_bytes + streamer.num_slots * streamer.slot_bytes
            assert planned <= budget - reserve
            assert ledger.peak == planned == streamer.device_bytes  # nothing else placed, nothing twice
            assert len(streamer.slot_buffers()) == streamer.num_slots
        assert ledger.current == 0
    assert streamer.streamed == []  # the largest budget holds every block
    with pytest.raises(BudgetError, match="needs at least"):
        StreamedBlocks(block_modules(model), "cpu", reserve + minimum_capacity(sizes) - 1, reserve)


def test_less_budget_streams_more_blocks_and_more_bytes():
    model, _ = tiny_setup()
    sizes = block_sizes(model)
    streamed_bytes = []
    for capacity in range(minimum_capacity(sizes), sum(sizes) + 1, sizes[-1] // 2):
        resident = choose_resident(sizes, capacity)
        slots = 2 * max((sizes[i] for i in range(7) if i not in resident), default=0)
        assert sum(sizes[i] for i in resident) + slots <= capacity
        streamed_bytes.append(sum(sizes) - sum(sizes[i] for i in resident))
    assert streamed_bytes == sorted(streamed_bytes, reverse=True) and streamed_bytes[-1] == 0


def test_close_restores_placement_weights_and_hooks():
    model, inputs = tiny_setup()
    cas, id_injection = injection()
    before = snapshot(model)
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    with torch.no_grad():
        expected = model(**inputs, id_injection=id_injection)
        transfer = LoggingTransfer(lazy=True)
        streamer = StreamedBlocks(block_modules(model), "cpu", 10**9, transfer=transfer, resident=[2])
        model(**inputs, id_injection=id_injection)
        streamer.close()
        streamer.close()  # idempotent
        copies = len(transfer.log)
        assert torch.equal(model(**inputs, id_injection=id_injection), expected)
    assert len(transfer.log) == copies  # no hook left behind
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in block_modules(model))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    owned = {b.untyped_storage().data_ptr() for b in transfer.device_buffers}
    for name, param in model.named_parameters():
        assert param.device.type == "cpu" and param.untyped_storage().data_ptr() not in owned
        assert name.startswith(("double_blocks", "single_blocks")) or param.data_ptr() == pointers[name]
    assert streamer.ledger.current == 0


def test_full_size_resident_choice_keeps_double_blocks_and_spreads_streamed_singles():
    flow = build_flow_model(MODELS["flux-dev"].params, "meta")
    blocks = block_modules(flow)
    sizes = [FlatLayout(b).nbytes for b in blocks]
    double, single = sizes[0], sizes[-1]
    assert (double, single) == (679_662_592, 283_183_616)  # every tensor already 256-byte aligned
    other = FlatLayout(flow, exclude=blocks).nbytes
    assert 0 <= sum(sizes) + other - FLUX_DIT_BYTES < 256  # padding of tiny tensors
    assert minimum_capacity(sizes) == 2 * double

    capacity = 19 * double + 2 * single + 20 * single  # all doubles, two single slots, 20 singles
    resident = choose_resident(sizes, capacity)
    assert resident[:19] == list(range(19)) and len(resident) == 39
    streamed = [i for i in range(57) if i not in resident]
    gaps = {b - a for a, b in itertools.pairwise(streamed)}
    assert gaps <= {2, 3}  # 18 streamed among 38 singles: every second or third one

    small = choose_resident(sizes, 8 * GiB)  # too small for all doubles: double-size slots
    slot = max(sizes[i] for i in range(57) if i not in small)
    assert slot == double and sum(sizes[i] for i in small) + 2 * slot <= 8 * GiB
    assert sum(sizes[i] for i in small) > 8 * GiB - 2 * slot - single  # no block left that would fit
    with pytest.raises(BudgetError):
        choose_resident(sizes, 2 * double - 1)


# -- ComponentOffload -------------------------------------------------------------------------------


def test_component_offload_moves_components_only_while_used():
    a, b = small_component(0), small_component(1)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected_a, expected_b = a(x), b(x)
    before_a = snapshot(a)
    transfer = LoggingTransfer(lazy=True)
    offload = ComponentOffload("cpu", transfer=transfer)
    offload.add(a, name="a")
    offload.add(b, name="b")
    size_a, size_b = FlatLayout(a).nbytes, FlatLayout(b).nbytes
    assert offload.ledger.current == 0 and not offload.is_on_device(a)
    with torch.no_grad():
        for _ in range(2):
            with offload.on_device(a):
                assert offload.is_on_device(a) and not offload.is_on_device(b)
                assert offload.ledger.current == size_a
                assert torch.equal(a(x), expected_a)
            assert not offload.is_on_device(a) and offload.ledger.current == 0
            with offload.on_device(b, None):  # None: a component this pipeline does not have
                assert torch.equal(b(x), expected_b)
    assert transfer.copies() == ["a", "b", "a", "b"]
    assert offload.ledger.peak == max(size_a, size_b)
    offload.close()
    assert all(torch.equal(before_a[k], v) for k, v in a.state_dict().items())
    assert not offload.is_on_device(a)


def test_prefetch_starts_next_copy_while_current_component_runs():
    a, b = small_component(0), small_component(1)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected_b = b(x)
    transfer = LoggingTransfer(lazy=True)
    offload = ComponentOffload("cpu", transfer=transfer)
    with torch.no_grad():
        with offload.on_device(a):
            offload.prefetch(b)
            transfer.log.append(("compute", "a"))
            a(x)
            assert offload.ledger.current == FlatLayout(a).nbytes + FlatLayout(b).nbytes
        assert not offload.is_on_device(b)  # copied, not yet waited for nor bound
        with offload.on_device(b):
            transfer.log.append(("compute", "b"))
            assert torch.equal(b(x), expected_b)  # lazy copies: only right if on_device waited
    names = [e for e in transfer.log if e[0] in ("copy", "compute", "wait")]
    assert names == [
        ("copy", "Sequential", "Sequential"),  # a, after its allocation event
        ("wait", "Sequential"),
        ("copy", "Sequential", "Sequential"),  # b, prefetched
        ("compute", "a"),
        ("wait", "Sequential"),  # on_device(b) waits for the prefetch, copies nothing
        ("compute", "b"),
    ]
    assert offload.ledger.peak == FlatLayout(a).nbytes + FlatLayout(b).nbytes


def test_unused_prefetch_is_waited_for_before_its_memory_is_freed():
    a = small_component(0)
    transfer = LoggingTransfer(lazy=True)
    offload = ComponentOffload("cpu", transfer=transfer)
    offload.add(a, name="a")
    offload.prefetch(a)
    offload.offload(a)  # e.g. the stage it was fetched for did not run
    # on CUDA the compute stream must be past the copy before the allocator reuses the memory
    assert transfer.log[-3:] == [("record", "a"), ("copy", "a", "a"), ("wait", "a")]
    assert not transfer.pending and offload.ledger.current == 0 and not offload.is_on_device(a)
    with pytest.raises(RuntimeError, match="not loaded"):
        offload.unload(a)


def test_resident_and_nested_components_and_group_components():
    a, b, c = small_component(0), small_component(1), small_component(2)
    transfer = LoggingTransfer()
    offload = ComponentOffload("cpu", transfer=transfer)
    offload.add(a, resident=True)
    offload.add([b, c], name="bc")
    assert offload.is_on_device(a) and offload.ledger.current == FlatLayout(a).nbytes
    with offload.on_device(a), offload.on_device([b, c]):
        with offload.on_device([b, c]):  # nested use keeps it loaded
            pass
        assert offload.is_on_device([b, c])
    assert offload.is_on_device(a) and not offload.is_on_device([b, c])
    assert transfer.copies() == ["bc"]
    with pytest.raises(ValueError, match="already managed"):
        offload.add(nn.Sequential(b[0]))
    offload.close()
    assert offload.ledger.current == 0


def test_streamed_dit_with_offloaded_cross_attentions_share_one_ledger():
    model, inputs = tiny_setup()
    cas, id_injection = injection()
    with torch.no_grad():
        expected = model(**inputs, id_injection=id_injection)
    sizes = block_sizes(model)
    ledger = DeviceLedger()
    transfer = LoggingTransfer(lazy=True)
    offload = ComponentOffload("cpu", transfer=transfer, ledger=ledger)
    offload.add(cas, name="pulid_ca")
    with (
        torch.no_grad(),
        StreamedBlocks(
            block_modules(model), "cpu", minimum_capacity(sizes), transfer=transfer, ledger=ledger
        ) as streamer,
    ):
        for _ in range(2):
            with offload.on_device(cas):
                assert torch.equal(model(**inputs, id_injection=id_injection), expected)
    assert ledger.peak == streamer.device_bytes + FlatLayout(cas).nbytes
    offload.close()


# -- the VRAM budget plan ---------------------------------------------------------------------------

COUNTS = plan_counts()  # the default request: 28 steps, no true CFG


@pytest.fixture(scope="module")
def full_sizes():
    """The full-size pipeline's declared components, measured on the meta device."""
    return {size.name: size for size in measure(meta_pipeline("flux-dev").components())}


def test_full_size_component_bytes(full_sizes):
    assert 0 <= full_sizes["dit"].total - FLUX_DIT_BYTES < 256  # packed sizes: each tensor padded to 256
    assert full_sizes["t5"].total == 9_524_621_312  # the T5-XXL encoder's tensor bytes
    assert len(full_sizes["t5"].blocks) == 24 and full_sizes["t5"].blocks[1] == 385_892_352
    assert full_sizes["pulid_ca"].total == 839_270_400 and 0 <= full_sizes["ae"].total - 335_278_732 < 1024
    assert len(full_sizes["dit"].blocks) == 57 and full_sizes["dit"].uses == "step"
    assert [s.stage for s in full_sizes.values()] == ["text", "text", "id", "denoise", "denoise", "decode"]


def expected_peaks(plan, sizes):
    """The stage peaks recomputed from the plan's modes: what must be on the device in each stage."""
    permanent = DEFAULT_OVERHEAD + sum(sizes[name].total for name in plan.resident)
    loaded = {stage.name: stage.reserve for stage in STAGES}
    for size in sizes.values():
        mode = plan.modes[size.name]
        if mode == "offload":
            loaded[size.stage] += size.total
        elif mode == "stream":
            permanent += sum(size.blocks[i] for i in plan.resident_blocks[size.name])
            loaded[size.stage] += size.other + plan.num_slots * plan.slot_bytes(size.name)
    return {stage: permanent + extra for stage, extra in loaded.items()}


@pytest.mark.parametrize("budget_gb", [80, 32, 24, 16, 12, 8])
def test_plan_arithmetic_for_full_size_flux(full_sizes, budget_gb):
    plan = plan_memory(list(full_sizes.values()), STAGES, budget_gb * GiB, counts=COUNTS)
    assert plan.stage_peaks == expected_peaks(plan, full_sizes)
    assert plan.peak <= budget_gb * GiB
    for name, mode in plan.modes.items():
        if mode == "stream":
            blocks = full_sizes[name].blocks
            streamed = plan.streamed_blocks(name)
            assert streamed and plan.slot_bytes(name) == max(blocks[i] for i in streamed)
            runs = COUNTS[full_sizes[name].uses]
            assert plan.transfer_bytes >= runs * sum(blocks[i] for i in streamed)
    assert "dit" in str(plan) and f"budget {budget_gb:.2f} GiB" in str(plan)
    if budget_gb == 80:
        assert set(plan.resident) == set(full_sizes) and plan.transfer_bytes == 0
    if budget_gb == 24:  # every double block and most single blocks stay; T5 streams
        assert plan.modes["dit"] == "stream" and plan.modes["t5"] == "stream"
        assert set(range(19)) <= set(plan.resident_blocks["dit"])
        assert len(plan.resident_blocks["dit"]) >= 41  # the 24 GiB plan measured in BENCHMARKS.md kept 41


def test_more_budget_never_copies_more(full_sizes):
    sizes = list(full_sizes.values())
    costs = [plan_memory(sizes, STAGES, gb * GiB, counts=COUNTS).transfer_bytes for gb in range(7, 42, 1)]
    assert costs == sorted(costs, reverse=True) and costs[-1] == 0 < costs[0]


def test_aggressive_offload_is_the_smallest_plan_and_flags_map_to_plans(full_sizes):
    sizes = list(full_sizes.values())
    aggressive = MemoryPolicy(aggressive=True).plan(sizes, STAGES, COUNTS)
    assert aggressive.budget == aggressive.peak < 6 * GiB
    assert aggressive.modes["dit"] == "stream" and aggressive.modes["t5"] == "stream"
    with pytest.raises(BudgetError, match="smallest plan needs"):
        plan_memory(sizes, STAGES, aggressive.peak - 1, counts=COUNTS)
    offload = MemoryPolicy(offload=True).plan(sizes, STAGES, COUNTS)
    assert set(offload.modes.values()) == {"offload"}
    denoise = next(stage for stage in STAGES if stage.name == "denoise")
    dit, pulid_ca = full_sizes["dit"].total, full_sizes["pulid_ca"].total
    assert offload.stage_peaks["denoise"] == DEFAULT_OVERHEAD + dit + pulid_ca + denoise.reserve
    assert MemoryPolicy().plan(sizes, STAGES, COUNTS).transfer_bytes == 0
    budget = MemoryPolicy(vram_budget_gb=20, aggressive=True).plan(sizes, STAGES, COUNTS)
    assert budget.budget == 20 * GiB and budget.peak <= 20 * GiB


def test_the_most_used_component_gets_the_resident_blocks():
    """Two streamed components in different stages: the one run on every step keeps its blocks."""
    stages = (Stage("a", 0), Stage("b", 0))
    per_step = measure_like("dit", "b", [100] * 6, uses="step")
    per_prompt = measure_like("t5", "a", [100] * 6, uses="prompt")
    modes = {"t5": "stream", "dit": "stream"}
    plan = evaluate_plan(
        [per_prompt, per_step], stages, modes, 700, overhead=0, counts={"step": 20, "prompt": 1}
    )
    # 5 DiT blocks resident (500) + two 100-byte slots in its stage; T5's slots fit beside them
    assert len(plan.resident_blocks["dit"]) == 5 and plan.resident_blocks["t5"] == ()
    assert plan.stage_peaks == {"a": 500 + 200, "b": 500 + 200}
    assert plan.transfer_bytes == 1 * 100 * 20 + 6 * 100
    # budget for every block of either: the resident mode, not a streaming plan
    assert evaluate_plan([per_prompt, per_step], stages, modes, 1400, overhead=0) is None


def measure_like(name, stage, blocks, uses):
    from flux.offload import ComponentSize

    return ComponentSize(name, stage, total=sum(blocks), blocks=tuple(blocks), uses=uses)


# -- the whole pipeline ------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["all-streamed", "partly-resident", "smallest", "offload-flag", "resident"])
def test_pipeline_placement_gives_identical_images_within_the_planned_peak(pipeline, which):
    from flux.offload import PipelinePlacement

    pipeline.id_encoder.forget()
    expected = [pipeline.generate(r).latents for r in generation_requests()]
    before = {name: snapshot(m) for name, m in [("dit", pipeline.dit), ("t5", pipeline.t5)]}
    components = pipeline.components()
    plan = tiny_plans(measure(components))[which]
    pipeline.id_encoder.forget()
    transfer = LoggingTransfer(lazy=True)
    with PipelinePlacement(components, NO_RESERVES, plan, "cpu", transfer=transfer).attach() as placement:
        results = [pipeline.generate(r).latents for r in generation_requests()]
        # zero reserves: the plan counts weights only; prefetches use what the budget leaves
        assert placement.ledger.peak <= (plan.peak if plan.budget is None else plan.budget)
        assert placement.log == ["text", "id", "denoise", "decode", "text", "denoise", "decode"]
    assert all(torch.equal(a, b) for a, b in zip(results, expected, strict=True))
    assert placement.ledger.current == 0
    for name, module in [("dit", pipeline.dit), ("t5", pipeline.t5)]:
        after = module.state_dict()
        assert all(torch.equal(before[name][k], after[k]) for k in before[name])
        assert all(not m._forward_pre_hooks for m in module.modules())


def test_streaming_works_under_torch_compile_with_hooks_left_eager():
    from flux.compile import compile_repeated_blocks

    model, inputs = tiny_setup()
    with torch.no_grad():
        expected = model(**inputs)
    compile_repeated_blocks(model, backend="eager")  # dynamo tracing without a C++ toolchain
    with StreamedBlocks(block_modules(model), "cpu", 10**9, resident=[0]) as streamer, torch.no_grad():
        first, second = model(**inputs), model(**inputs)
    assert streamer.streamed and torch.equal(first, expected) and torch.equal(second, expected)
