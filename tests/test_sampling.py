"""Noise, schedule, packing and the denoising loop (with a model whose flow is known)."""

import math

import pytest
import torch

from flux.sampling import (
    GenerationCancelled,
    TextConditioning,
    denoise,
    get_noise,
    get_schedule,
    image_ids,
    pack,
    unpack,
)


def test_noise_shape_dtype_and_seed_semantics():
    a = get_noise(1, 1152, 896, device="cpu", dtype=torch.bfloat16, seed=42)
    b = get_noise(1, 1152, 896, device="cpu", dtype=torch.bfloat16, seed=42)
    c = get_noise(1, 1152, 896, device="cpu", dtype=torch.bfloat16, seed=43)
    assert a.shape == (1, 16, 144, 112) and a.dtype == torch.bfloat16
    assert torch.equal(a, b) and not torch.equal(a, c)
    # The official semantics: torch.randn with a device generator seeded with the seed.
    expected = torch.randn(
        1, 16, 144, 112, dtype=torch.bfloat16, generator=torch.Generator("cpu").manual_seed(42)
    )
    assert torch.equal(a, expected)
    assert get_noise(2, 1000, 1000, "cpu", torch.float32, 0).shape == (2, 16, 126, 126)  # ceil(1000/16)*2


@pytest.mark.parametrize("steps,seq_len", [(28, 4032), (4, 256), (20, 1024), (1, 4096)])
def test_schedule_matches_formula(steps, seq_len):
    ts = get_schedule(steps, seq_len)
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq_len - 256)
    for i, t in enumerate(ts):
        lin = 1 - i / steps
        expected = 0.0 if lin == 0 else math.exp(mu) / (math.exp(mu) + (1 / lin - 1))
        assert t == pytest.approx(expected, abs=1e-6)
    assert len(ts) == steps + 1 and ts[0] == 1.0 and ts[-1] == 0.0
    assert all(a > b for a, b in zip(ts, ts[1:], strict=False))


def test_unshifted_schedule_is_linear():
    assert get_schedule(4, 4096, shift=False) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_pack_unpack_roundtrip_and_layout():
    x = torch.randn(2, 16, 6, 4)
    packed = pack(x)
    assert packed.shape == (2, 6, 64)
    # token (row r, col c) holds channel-major 2x2 patches: index ch*4 + dy*2 + dx
    r, c, ch, dy, dx = 2, 1, 5, 1, 0
    assert packed[1, r * 2 + c, ch * 4 + dy * 2 + dx] == x[1, ch, 2 * r + dy, 2 * c + dx]
    assert torch.equal(unpack(packed, 48, 32), x)


def test_image_ids_are_row_and_column():
    ids = image_ids(2, 6, 4)
    assert ids.shape == (2, 6, 3)
    assert ids[0, 5].tolist() == [0.0, 2.0, 1.0] and ids[1, 1].tolist() == [0.0, 0.0, 1.0]


class LinearFlowModel(torch.nn.Module):
    """pred = a * img + b * t + offset(txt) + id residual: the Euler loop has a checkable result."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance, id_injection=None):
        self.calls.append(dict(t=timesteps.clone(), g=guidance.clone(), txt=txt, id=id_injection))
        out = -0.5 * img + timesteps[:, None, None] + txt.mean() + y.mean()
        if id_injection is not None:
            out = out + id_injection.after_double_block(0, img)
        return out


class ConstantID:
    def __init__(self, value):
        self.value = value

    def after_double_block(self, index, img):
        return torch.full_like(img, self.value)

    def after_single_block(self, index, img):
        return None


def cond(value):
    return TextConditioning(
        txt=torch.full((1, 3, 4), float(value)), txt_ids=torch.zeros(1, 3, 3), vec=torch.zeros(1, 2)
    )


def manual_euler(img, ts, pred_fn):
    for i, (a, b) in enumerate(zip(ts[:-1], ts[1:], strict=True)):
        img = img + (b - a) * pred_fn(i, img, a)
    return img


def test_denoise_is_euler_with_distilled_guidance_and_id_start_step():
    model = LinearFlowModel()
    img = torch.randn(1, 6, 8, dtype=torch.float64)
    ts = get_schedule(5, 6)
    out = denoise(
        model,
        img,
        torch.zeros(1, 6, 3),
        cond(0.25),
        ts,
        guidance=3.5,
        id_injection=ConstantID(0.1),
        id_start_step=2,
    )
    expected = manual_euler(img, ts, lambda i, x, t: -0.5 * x + t + 0.25 + (0.1 if i >= 2 else 0.0))
    assert torch.allclose(out, expected, atol=1e-12)
    assert [c["id"] is not None for c in model.calls] == [False, False, True, True, True]
    assert all(c["g"].item() == 3.5 and c["t"].dtype == img.dtype for c in model.calls)


def test_true_cfg_mixes_from_the_cfg_start_step_with_the_unconditional_id():
    model = LinearFlowModel()
    img = torch.randn(1, 6, 8, dtype=torch.float64)
    ts = get_schedule(4, 6)
    out = denoise(
        model,
        img,
        torch.zeros(1, 6, 3),
        cond(1.0),
        ts,
        neg_cond=cond(-1.0),
        true_cfg=3.0,
        cfg_start_step=1,
        id_injection=ConstantID(0.2),
        neg_id_injection=ConstantID(0.0),
    )

    def pred(i, x, t):
        pos = -0.5 * x + t + 1.0 + 0.2
        if i < 1:
            return pos
        neg = -0.5 * x + t - 1.0
        return neg + 3.0 * (pos - neg)

    assert torch.allclose(out, manual_euler(img, ts, pred), atol=1e-12)
    assert len(model.calls) == 4 + 3  # the negative pass skips step 0


def test_true_cfg_without_negative_prompt_is_an_error():
    with pytest.raises(ValueError, match="negative"):
        denoise(
            LinearFlowModel(), torch.zeros(1, 2, 4), torch.zeros(1, 2, 3), cond(0), [1.0, 0.0], true_cfg=2.0
        )


def test_callback_sees_every_step_and_can_cancel():
    seen = []

    def progress(info):
        seen.append((info.step, info.total))
        if info.step == 2:
            raise GenerationCancelled

    model = LinearFlowModel()
    with pytest.raises(GenerationCancelled):
        denoise(
            model, torch.zeros(1, 2, 4), torch.zeros(1, 2, 3), cond(0), get_schedule(6, 2), callback=progress
        )
    assert seen == [(0, 6), (1, 6), (2, 6)]
    assert len(model.calls) == 3
