"""The generation API under the app: load once, then turn requests into images.

:class:`PuLIDFluxPipeline` holds the text encoders, the DiT, the autoencoder, the PuLID weights
and the ID encoder, and never changes them: each request builds its own ID injection and
conditioning, so nothing of one request is left for the next. The steps and their numerics are
those of the official PuLID-FLUX app (noise, schedule, prompt encoding, ID tokens, denoising,
decoding under bf16 autocast).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from flux.autoencoder import AutoEncoder
from flux.model import Flux
from flux.sampling import (
    StepInfo,
    TextConditioning,
    denoise,
    get_noise,
    get_schedule,
    image_ids,
    pack,
    text_ids,
    unpack,
)
from pulid.id_encoder import IDEncoder
from pulid.injection import PuLIDInjection

MIN_SIDE, MAX_SIDE, SIDE_STEP = 256, 1536, 16
MAX_SEED = 2**64 - 1


class InvalidRequestError(ValueError):
    """A request setting is out of range; the message says which and what is allowed."""


@dataclass
class GenerationRequest:
    """Everything one image depends on. Defaults are the official demo's."""

    prompt: str
    id_images: list[np.ndarray] = field(default_factory=list)
    width: int = 896
    height: int = 1152
    num_steps: int = 20
    start_step: int = 0
    guidance: float = 4.0
    seed: int = -1
    id_weight: float = 1.0
    neg_prompt: str = "bad quality, worst quality, text, signature, watermark, extra limbs"
    true_cfg: float = 1.0
    cfg_start_step: int = 1
    max_sequence_length: int = 128

    @property
    def uses_true_cfg(self) -> bool:
        return abs(self.true_cfg - 1.0) > 1e-2

    def validate(self, min_side: int = MIN_SIDE, max_side: int = MAX_SIDE) -> None:
        problems = []
        for name in ("width", "height"):
            value = getattr(self, name)
            if not (min_side <= value <= max_side) or value % SIDE_STEP:
                problems.append(
                    f"{name} must be a multiple of {SIDE_STEP} from {min_side} to {max_side} (got {value})"
                )
        if not 1 <= self.num_steps <= 100:
            problems.append(f"number of steps must be from 1 to 100 (got {self.num_steps})")
        if not 0.0 <= self.id_weight <= 3.0 or math.isnan(self.id_weight):
            problems.append(f"id weight must be from 0 to 3 (got {self.id_weight})")
        if not -1 <= self.seed <= MAX_SEED:
            problems.append(f"seed must be -1 (random) or from 0 to {MAX_SEED} (got {self.seed})")
        if self.max_sequence_length not in (128, 256, 384, 512):
            problems.append(
                f"max sequence length must be 128, 256, 384 or 512 (got {self.max_sequence_length})"
            )
        if self.start_step < 0 or self.cfg_start_step < 0:
            problems.append("start steps cannot be negative")
        if not 0.0 <= self.guidance <= 100.0 or not 1.0 <= self.true_cfg <= 100.0:
            problems.append("guidance must be from 0 to 100 and true CFG scale from 1 to 100")
        if problems:
            raise InvalidRequestError("; ".join(problems))

    def settings(self) -> dict:
        """The request without the photos: what the PNG metadata records."""
        values = asdict(self)
        values.pop("id_images")
        values["num_id_images"] = len(self.id_images)
        return values


@dataclass
class GenerationResult:
    image: Image.Image
    seed: int
    metadata: dict
    debug_images: list[np.ndarray]
    latents: Tensor
    timings: dict[str, float]


def to_pil(decoded: Tensor) -> Image.Image:
    """(1, 3, H, W) in [-1, 1] -> PIL, truncating like the official app does."""
    x = decoded.clamp(-1, 1)[0].permute(1, 2, 0)
    return Image.fromarray((127.5 * (x + 1.0)).cpu().byte().numpy())


class PuLIDFluxPipeline:
    """Holds the loaded models (see :func:`pulid.loading.load_pipeline`) and generates images."""

    def __init__(
        self,
        *,
        flow: Flux,
        ae: AutoEncoder,
        t5: nn.Module,
        clip: nn.Module,
        pulid_ca: nn.ModuleList,
        id_encoder: IDEncoder | None,
        device: torch.device | str,
        dtype: torch.dtype = torch.bfloat16,
        info: dict | None = None,
    ):
        self.flow = flow
        self.ae = ae
        self.t5 = t5
        self.clip = clip
        self.pulid_ca = pulid_ca
        self.id_encoder = id_encoder
        self.device = torch.device(device)
        self.dtype = dtype
        self.info = dict(info or {})
        # A memory placement (flux.offload) wrapping these models, when one is used; kept here so
        # it lives as long as the pipeline. The pipeline itself never moves weights.
        self.placement = None

    def encode_prompt(self, prompt: str, max_length: int) -> TextConditioning:
        txt = self.t5([prompt], max_length=max_length).to(self.device)
        vec = self.clip([prompt]).to(self.device)
        return TextConditioning(txt=txt, txt_ids=text_ids(1, txt.shape[1], self.device), vec=vec)

    def injection(self, tokens: Tensor | None, weight: float) -> PuLIDInjection | None:
        if tokens is None:
            return None
        params = self.flow.params
        return PuLIDInjection(self.pulid_ca, tokens, weight, params.depth, params.depth_single_blocks)

    @torch.inference_mode()
    def generate(
        self, request: GenerationRequest, callback: Callable[[StepInfo], None] | None = None
    ) -> GenerationResult:
        request.validate()
        timings: dict[str, float] = {}
        start = time.perf_counter()
        seed = request.seed if request.seed != -1 else torch.Generator(device="cpu").seed()

        noise = get_noise(1, request.height, request.width, device=self.device, dtype=self.dtype, seed=seed)
        timesteps = get_schedule(request.num_steps, noise.shape[-1] * noise.shape[-2] // 4, shift=True)

        t0 = time.perf_counter()
        cond = self.encode_prompt(request.prompt, request.max_sequence_length)
        neg_cond = (
            self.encode_prompt(request.neg_prompt, request.max_sequence_length)
            if request.uses_true_cfg
            else None
        )
        timings["text_encoding_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        debug_images: list[np.ndarray] = []
        id_tokens = uncond_tokens = None
        if request.id_images:
            if self.id_encoder is None:
                raise InvalidRequestError("this pipeline was built without an ID encoder")
            embedding = self.id_encoder(request.id_images, with_uncond=request.uses_true_cfg)
            id_tokens, uncond_tokens, debug_images = (
                embedding.tokens,
                embedding.uncond_tokens,
                embedding.debug_images,
            )
        timings["id_embedding_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        latents = denoise(
            self.flow,
            pack(noise),
            image_ids(1, noise.shape[-2], noise.shape[-1], self.device),
            cond,
            timesteps,
            guidance=request.guidance,
            neg_cond=neg_cond,
            true_cfg=request.true_cfg,
            cfg_start_step=request.cfg_start_step,
            id_injection=self.injection(id_tokens, request.id_weight),
            neg_id_injection=self.injection(uncond_tokens, request.id_weight),
            id_start_step=request.start_step,
            callback=callback,
        )
        timings["denoise_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        unpacked = unpack(latents.float(), request.height, request.width)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
            decoded = self.ae.decode(unpacked)
        image = to_pil(decoded.float())
        timings["decode_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - start

        metadata = {**request.settings(), "seed": seed, **self.info}
        return GenerationResult(
            image=image,
            seed=seed,
            metadata=metadata,
            debug_images=debug_images,
            latents=latents,
            timings=timings,
        )
