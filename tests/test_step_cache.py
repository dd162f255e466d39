"""The First-Block step cache: exact when off, the method's decisions, the ID and CFG rules, and no
state kept between runs.

Decisions are checked against an independent statement of the rule on the recorded signals:
step s (after the first ``keep_first`` and before the last ``keep_last``) skips the later blocks
iff mean|r_s - r_f| / mean|r_f| < threshold, where r_f is the first block's residual at the last
step that ran in full in the same branch.
"""

from __future__ import annotations

import pytest
import torch

from flux.model import Flux
from flux.sampling import TextConditioning, denoise, get_noise, get_schedule, image_ids, pack, text_ids
from flux.step_cache import FirstBlockCache
from pulid.request import GenerationRequest, InvalidRequestError
from tiny_random.models import tiny_flux_params


def tiny_flow(seed: int = 0) -> Flux:
    torch.manual_seed(seed)
    return Flux(tiny_flux_params()).eval()


def conditioning(flow: Flux, seed: int) -> TextConditioning:
    g = torch.Generator().manual_seed(seed)
    txt = torch.randn(1, 5, flow.params.context_in_dim, generator=g)
    return TextConditioning(
        txt=txt, txt_ids=text_ids(1, 5), vec=torch.randn(1, flow.params.vec_in_dim, generator=g)
    )


def run(flow, cache=None, steps=12, true_cfg=1.0, id_start_step=0, injection=None):
    noise = get_noise(1, 64, 64, "cpu", torch.float32, seed=3)
    with torch.no_grad():
        return denoise(
            flow,
            pack(noise),
            image_ids(1, noise.shape[-2], noise.shape[-1]),
            conditioning(flow, 1),
            get_schedule(steps, noise.shape[-1] * noise.shape[-2] // 4),
            neg_cond=conditioning(flow, 2),
            true_cfg=true_cfg,
            cfg_start_step=2,
            id_injection=injection,
            neg_id_injection=injection,
            id_start_step=id_start_step,
            step_cache=cache,
        )


class Recorder:
    """Wraps the cache's branch views to record, per pass, the step, the branch, the first block's
    residual and whether the later blocks were skipped."""

    def __init__(self, cache: FirstBlockCache):
        self.cache = cache
        self.passes: list[dict] = []
        self.step = -1

    def begin_step(self, step, total, *, id_starts=False):
        self.step = step
        self.cache.begin_step(step, total, id_starts=id_starts)

    def branch(self, name):
        view = self.cache.branch(name)
        recorder = self

        class Spy:
            def reuse(self, first_residual):
                result = view.reuse(first_residual)
                recorder.passes.append(
                    dict(
                        step=recorder.step,
                        branch=name,
                        first=first_residual.clone(),
                        reused=result is not None,
                    )
                )
                return result

            def store(self, first_residual, rest_residual):
                view.store(first_residual, rest_residual)

        return Spy()


def expected_decisions(passes, threshold, total, keep_first=1, keep_last=1, id_start=0):
    """The rule, restated: per branch, compare with the last full pass's first residual."""
    last_full: dict[str, torch.Tensor] = {}
    out = []
    for p in passes:
        if id_start and p["step"] == id_start:
            last_full = {}
        reference = last_full.get(p["branch"])
        may = keep_first <= p["step"] < total - keep_last
        reuse = False
        if may and reference is not None:
            change = (p["first"].double() - reference.double()).abs().mean() / reference.double().abs().mean()
            reuse = bool(change < threshold)
        if not reuse:
            last_full[p["branch"]] = p["first"]
        out.append(reuse)
    return out


def test_threshold_zero_is_the_uncached_run_bit_for_bit():
    flow = tiny_flow()
    cache = FirstBlockCache(0.0)
    assert torch.equal(run(flow, cache), run(flow))
    assert cache.full_passes() == 12 and cache.reused_passes() == 0


def test_decisions_follow_the_rule_on_a_trajectory_that_changes_little():
    flow = tiny_flow()
    recorder = Recorder(FirstBlockCache(0.35))
    run(flow, recorder)
    got = [p["reused"] for p in recorder.passes]
    assert got == expected_decisions(recorder.passes, 0.35, 12)
    assert any(got) and not all(got)  # the threshold is one where some steps skip and some do not
    assert not got[0] and not got[-1]  # the first and last steps always run in full
    assert recorder.cache.reused_passes() == sum(got)


def test_a_skipped_pass_adds_the_stored_residual_to_the_first_blocks_output():
    """On an unchanged input, reusing gives the full pass's output (to float rounding)."""
    flow = tiny_flow()
    g = torch.Generator().manual_seed(5)
    p = flow.params
    inputs = dict(
        img=torch.randn(1, 16, p.in_channels, generator=g),
        img_ids=torch.zeros(1, 16, 3),
        txt=torch.randn(1, 5, p.context_in_dim, generator=g),
        txt_ids=torch.zeros(1, 5, 3),
        timesteps=torch.tensor([0.5]),
        y=torch.randn(1, p.vec_in_dim, generator=g),
        guidance=torch.tensor([3.5]),
    )
    cache = FirstBlockCache(0.5)
    with torch.no_grad():
        cache.begin_step(0, 10)
        full = flow(**inputs, step_cache=cache.branch("cond"))
        calls = []
        hook = flow.single_blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
        cache.begin_step(1, 10)
        reused = flow(**inputs, step_cache=cache.branch("cond"))
        hook.remove()
    assert cache.reused_passes() == 1 and not calls  # the later blocks did not run
    assert torch.allclose(reused, full, rtol=1e-5, atol=1e-6)
    assert torch.equal(full, flow(**inputs))  # with the cache storing only, the output is the plain one


def test_the_id_start_step_runs_in_full_and_is_never_compared_across():
    flow = tiny_flow()

    class Shift:  # an identity injection that moves the image tokens after every double block
        def after_double_block(self, index, img):
            return torch.full_like(img, 0.5)

        def after_single_block(self, index, img):
            return None

    recorder = Recorder(FirstBlockCache(10.0))  # a threshold that would reuse everything it may
    run(flow, recorder, id_start_step=4, injection=Shift())
    steps = {p["step"]: p["reused"] for p in recorder.passes}
    assert steps[4] is False and steps[0] is False and steps[11] is False
    assert all(steps[s] for s in range(1, 4)) and all(steps[s] for s in range(5, 11))
    got = [p["reused"] for p in recorder.passes]
    assert got == expected_decisions(recorder.passes, 10.0, 12, id_start=4)


def test_true_cfg_branches_keep_separate_state():
    flow = tiny_flow()
    recorder = Recorder(FirstBlockCache(0.35))
    run(flow, recorder, true_cfg=3.0)
    branches = [p["branch"] for p in recorder.passes]
    assert branches.count("uncond") == 10  # the negative pass from cfg_start_step 2 on
    assert [p["reused"] for p in recorder.passes] == expected_decisions(recorder.passes, 0.35, 12)
    first_uncond = next(p for p in recorder.passes if p["branch"] == "uncond")
    assert first_uncond["reused"] is False  # its own first pass, although "cond" has a reference
    cache = recorder.cache
    assert cache.full_passes("uncond") + cache.reused_passes("uncond") == 10


def test_thresholds_are_checked():
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            FirstBlockCache(bad)
    for bad in ("-0.1", "nan", "inf", "0.9"):
        with pytest.raises(InvalidRequestError, match="from 0 to 0.5"):
            GenerationRequest.from_values(prompt="p", cache_threshold=bad)


def test_the_pipeline_reports_full_steps_keeps_batches_exact_and_keeps_nothing(pipeline):
    from skimage import data as skimage_data

    base = dict(
        prompt="a photo", width=256, height=256, num_steps=10, seed=4, id_images=[skimage_data.astronaut()]
    )
    plain = pipeline.generate(GenerationRequest(**base))
    cached = pipeline.generate(GenerationRequest(**base, cache_threshold=0.5, num_images=2))
    full, total = (int(v) for v in cached.metadata["cache_full_steps"].split(" of "))
    assert total == 10 and 2 <= full <= 10 and cached.metadata["cache_threshold"] == 0.5
    alone = pipeline.generate(GenerationRequest(**{**base, "seed": 5}, cache_threshold=0.5))
    assert torch.equal(cached.images[1].latents, alone.latents)  # each image is its seed alone
    again = pipeline.generate(GenerationRequest(**base))
    assert torch.equal(plain.latents, again.latents) and "cache_full_steps" not in again.metadata
    zero = pipeline.generate(GenerationRequest(**base, cache_threshold=0.0))
    assert torch.equal(plain.latents, zero.latents)
    everything = pipeline.generate(
        GenerationRequest(**base, cache_threshold=0.5, cache_full_first=10, cache_full_last=0)
    )
    assert everything.metadata["cache_full_steps"] == "10 of 10"  # the first 10 steps never skip
    # from a photo only the last strength x steps run: the count is of those (all kept in full here)
    photo = skimage_data.astronaut()[:256, :256].copy()
    steps: list[int] = []
    edited = pipeline.generate(
        GenerationRequest(
            **{**base, "num_steps": 20},
            init_image=photo,
            strength=0.3,
            cache_threshold=0.5,
            cache_full_first=10,
        ),
        callback=lambda info: steps.append(info.step),
    )
    assert 0 < len(steps) < 20
    assert edited.metadata["cache_full_steps"] == f"{len(steps)} of {len(steps)}"
