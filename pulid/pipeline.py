"""The generation API under the app: load once, then turn requests into images.

:class:`PuLIDFluxPipeline` holds the text encoders, the DiT, the autoencoder, the PuLID weights
and the ID encoder, and never changes them: each request builds its own ID injection and
conditioning, so nothing of one request is left for the next. The steps and their numerics are
those of the official PuLID-FLUX app (noise, schedule, prompt encoding, ID tokens, denoising,
decoding under bf16 autocast).
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.nn import functional as F

from flux.autoencoder import AttnBlock, AutoEncoder, ResnetBlock
from flux.lora import ActiveLoRA, LoRAAdapters, LoRAError, LoRAFile
from flux.model import Flux
from flux.offload.device_map import DeviceMap
from flux.offload.structure import Component, Stage
from flux.parallel import SequenceParallelFlux, ShardingError
from flux.repeated import block_modules
from flux.sampling import (
    LATENT_CHANNELS,
    TOKEN_PIXELS,
    GenerationCancelled,
    Inpainting,
    StepInfo,
    TextConditioning,
    denoise,
    get_noise,
    get_schedule,
    image_ids,
    image_to_image_start,
    noised,
    pack,
    text_ids,
    unpack,
)
from flux.step_cache import FirstBlockCache
from pulid import stages
from pulid.id_encoder import IDEmbedding, IDEncoder
from pulid.injection import Identity, PuLIDInjection
from pulid.limits import MAX_IMAGES_PER_REQUEST
from pulid.loras import LoRALibrary
from pulid.regions import (
    check_region_area,
    column_regions,
    covers_everything,
    overlap_share,
    token_region,
)
from pulid.request import RANDOM_SEEDS, GenerationRequest, InvalidRequestError, mask_values
from pulid.similarity import describe, identity_similarity

GiB = 1024**3
FACE_MARGIN = 0.25  # "repaint the face": the face box grown by this share of its size on each side

# The stages of a generation, in order, and the device memory each needs besides weights, for
# 1024x1024 images (``python benchmarks/bench_offload.py`` on an H100, bf16: the DiT's activations
# peaked at 0.59 GiB, the autoencoder decode at 3.53 GiB; the ID stage holds the face models).
STAGES = (
    Stage("text", reserve=1 * GiB),
    Stage("id", reserve=2 * GiB),
    Stage("denoise", reserve=3 * GiB // 2),
    Stage("decode", reserve=4 * GiB),
)


@dataclass
class GeneratedImage:
    """One image of a request, with its seed, the settings that made it and its face similarity
    (:mod:`pulid.similarity`; None when no face was found or no ID photo given)."""

    image: Image.Image
    seed: int
    metadata: dict
    latents: Tensor  # (1, tokens, 64) packed, float32 as the sampler leaves them
    face_similarity: float | None = None  # with several people: the lowest of theirs


class FirstImage:
    """A request's result read as its first image, the only one unless more were asked for
    (``result.seed``, ``result.metadata``), for the results of the pipeline and of the service."""

    images: list

    @property
    def seed(self) -> int:
        return self.images[0].seed

    @property
    def metadata(self) -> dict:
        return self.images[0].metadata


@dataclass
class GenerationResult(FirstImage):
    """The images of one request (``num_images`` of them, seeds seed, seed+1, ...)."""

    images: list[GeneratedImage]
    debug_images: list[np.ndarray]
    timings: dict[str, float]

    @property
    def image(self) -> Image.Image:
        """The first image (the only one unless the request asked for more)."""
        return self.images[0].image

    @property
    def latents(self) -> Tensor:
        return self.images[0].latents


def to_pil(decoded: Tensor) -> Image.Image:
    """(1, 3, H, W) in [-1, 1] -> PIL, in the official arithmetic: clamp, ``127.5 * (x + 1)`` and the
    truncating uint8 conversion, all in the decoder's output dtype (bf16 under autocast), on its
    device; only the uint8 pixels cross to the host."""
    x = decoded.clamp(-1, 1)[0].permute(1, 2, 0)
    pixels = (127.5 * (x + 1.0)).to(torch.uint8).contiguous()
    return Image.fromarray(pixels.cpu().numpy())


class PuLIDFluxPipeline:
    """Holds the loaded models (see :func:`pulid.loading.load_pipeline`) and generates images."""

    #: The stages a generation runs through, in order (see :meth:`components` for what runs in each).
    stages = STAGES

    def __init__(
        self,
        *,
        dit: Flux,
        ae: AutoEncoder,
        t5: nn.Module,
        clip: nn.Module,
        pulid_ca: nn.ModuleList,
        id_encoder: IDEncoder | None,
        device: torch.device | str,
        dtype: torch.dtype = torch.bfloat16,
        info: dict | None = None,
        lora_adapters: LoRAAdapters | None = None,
        lora_library: LoRALibrary | None = None,
        device_map: DeviceMap | None = None,
        parallel: SequenceParallelFlux | None = None,
    ):
        """``device``: where the DiT denoises. ``device_map``: the device of each stage when they
        are not all on ``device`` (:mod:`flux.offload.device_map`); each stage's results move to
        the next stage's device once. ``parallel``: ``dit`` wrapped for this rank when one image
        is denoised on several GPUs (:mod:`flux.parallel`); every rank then runs the same requests."""
        self.dit = dit
        self.ae = ae
        self.t5 = t5
        self.clip = clip
        self.pulid_ca = pulid_ca
        self.id_encoder = id_encoder
        self.device = torch.device(device)
        self.device_map = device_map or DeviceMap.single(self.device, self.stages)
        if self.device_map.device_of("denoise") != self.device:
            raise ValueError(
                f"the device map denoises on {self.device_map.device_of('denoise')}, not {device}"
            )
        self.dtype = dtype
        self.info = dict(info or {})
        # LoRA slots wrapping the DiT (installed by the loader, before any compilation) and where
        # LoRA files come from; a request's LoRAs fill the slots for its denoising only.
        self.lora_adapters = lora_adapters
        self.lora_library = lora_library
        # Merge LoRAs into resident weights (restored after each request) where they fit; False
        # keeps every layer on the side path. Memory placements never merge.
        self.lora_merge = True
        # A memory placement (flux.offload) wrapping these models, when one is used; kept here so
        # it lives as long as the pipeline. The pipeline itself never moves weights. With several
        # devices, ``placement`` is the denoising device's and ``placements`` holds every one.
        self.placement = None
        self.placements: list = []
        if parallel is not None and parallel.dit is not dit:
            raise ValueError("the sequence-parallel wrapper must wrap this pipeline's DiT")
        self.parallel = parallel

    def compiled_blocks(self) -> list[nn.Module]:
        """The modules compiled one by one (``--compile``, ahead of time on ZeroGPU): the DiT's
        declared blocks, then the ID cross-attentions."""
        return [*block_modules(self.dit), *self.pulid_ca]

    def with_options(self, **changes) -> PuLIDFluxPipeline:
        """A pipeline over the same models (shared, not copied) with some construction options
        changed: ``parallel``, ``device_map``, or a model moved to another device."""
        options = dict(
            dit=self.dit,
            ae=self.ae,
            t5=self.t5,
            clip=self.clip,
            pulid_ca=self.pulid_ca,
            id_encoder=self.id_encoder,
            device=self.device,
            dtype=self.dtype,
            info=self.info,
            lora_adapters=self.lora_adapters,
            lora_library=self.lora_library,
            device_map=self.device_map,
            parallel=self.parallel,
        )
        return type(self)(**{**options, **changes})

    def components(self) -> list[Component]:
        """The models by stage, for memory placement: what runs when, and what may stream.

        T5's layers and the DiT's blocks may stream (the T5 runs once per prompt, the DiT and the
        ID cross-attentions once per denoising pass); the autoencoder's stage begins at its decoder.
        """
        parts = [
            Component("t5", "text", (self.t5,), blocks=tuple(block_modules(self.t5)), uses="prompt"),
            Component("clip", "text", (self.clip,), uses="prompt"),
        ]
        if self.id_encoder is not None:
            parts.append(Component("id_encoder", "id", (self.id_encoder.eva, self.id_encoder.id_former)))
        parts += [
            Component("pulid_ca", "denoise", (self.pulid_ca,), uses="step"),
            Component("dit", "denoise", (self.dit,), blocks=tuple(block_modules(self.dit)), uses="step"),
            # Its stage begins at the decoder; the encoder (a photo to start from) also brings it in.
            Component("ae", "decode", (self.ae,), entry=(self.ae.encoder, self.ae.decoder)),
        ]
        return parts

    def encode_prompt(self, prompt: str, max_length: int) -> TextConditioning:
        """The prompt's T5 tokens (``max_length`` of them), their ids and CLIP's pooled vector, on the DiT's
        device."""
        txt = self.t5([prompt], max_length=max_length).to(self.device)
        vec = self.clip([prompt]).to(self.device)
        return TextConditioning(txt=txt, txt_ids=text_ids(1, txt.shape[1], self.device), vec=vec)

    def batch_limit(self) -> int:
        """How many images denoise together: all of a request's when the models are resident; one
        at a time under a memory placement, whose plan reserves activations for one image."""
        return 1 if self.placement is not None else MAX_IMAGES_PER_REQUEST

    @torch.inference_mode()
    def decode(
        self, latents: Tensor, height: int, width: int, on_block: Callable[[str], None] | None = None
    ) -> Image.Image:
        """Packed latents -> the image, as the official app decodes: float32 latents into the
        autoencoder under autocast to the pipeline's dtype (bf16), then :func:`to_pil`. A float32
        pipeline (the tiny one) decodes in float32 throughout.

        ``on_block("decoding")`` runs before each of the decoder's blocks (hooks that live only for
        this call), so a large decode can be cancelled between them.
        """
        device = self.device_map.device_of("decode")
        unpacked = unpack(latents.float(), height, width).to(device)
        low_precision = self.dtype != torch.float32
        hooks = []
        if on_block is not None:
            blocks = [m for m in self.ae.decoder.modules() if isinstance(m, (ResnetBlock, AttnBlock))]
            announce = lambda *_: on_block(stages.DECODING)  # noqa: E731
            hooks = [block.register_forward_pre_hook(announce) for block in blocks]
        try:
            with torch.autocast(device_type=device.type, dtype=self.dtype, enabled=low_precision):
                decoded = self.ae.decode(unpacked)
        finally:
            for hook in hooks:
                hook.remove()
        return to_pil(decoded)

    @torch.inference_mode()
    def encode_image(self, image: np.ndarray) -> Tensor:
        """An RGB photo (already the image's size) -> the autoencoder's latents (1, 16, H/8, W/8):
        the posterior's mean, so the same photo and seed give the same image. Under autocast to
        the pipeline's dtype, as decoding runs; the latents come back in that dtype, on the
        denoising device."""
        device = self.device_map.device_of("decode")  # the autoencoder's
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None]
        x = pixels.to(device, torch.float32) / 127.5 - 1.0
        low_precision = self.dtype != torch.float32
        with torch.autocast(device_type=device.type, dtype=self.dtype, enabled=low_precision):
            latents = self.ae.encode(x, mean=True)
        return latents.to(self.device, self.dtype)

    def start_image(self, request: GenerationRequest) -> tuple[StartImage, dict[str, str]]:
        """The request's photo to start from, encoded, and what of it to repaint at the latents'
        grid; with notes for the metadata on what was cropped or resized."""
        fitted, note = fit_image(request.init_image, request.width, request.height)
        notes = {"init_image_fit": note} if note else {}
        values = self.repaint_values(request, notes)
        mask = None
        if values is not None:
            mask = latent_mask(fit_image(values, request.width, request.height)[0]).to(
                self.device, self.dtype
            )
            notes["mask_area"] = f"{float(mask.mean()):.0%} of the image repainted"
        return StartImage(self.encode_image(fitted), mask), notes

    def repaint_values(self, request: GenerationRequest, notes: dict[str, str]) -> np.ndarray | None:
        """What of the photo to start from to repaint, as (H, W) uint8 at the photo's size: the
        face region, the mask given (resized to the photo, noted), or None for all of it."""
        if request.repaint == "face":
            return self.face_mask(request.init_image)
        if request.mask is None:
            return None
        return photo_sized(mask_values(request.mask), request.init_image, notes, "mask_fit")

    def face_mask(self, photo: np.ndarray) -> np.ndarray:
        """A mask over the largest face of ``photo``: its box grown by :data:`FACE_MARGIN` of its
        size on each side, within the photo."""
        box = None if self.id_encoder is None else self.id_encoder.face_box(photo)
        if box is None:
            raise InvalidRequestError(
                "No face was found in the photo to start from, so there is no face to repaint: "
                "give a mask instead, or choose 'mask'."
            )
        x1, y1, x2, y2 = box
        grow_x, grow_y = FACE_MARGIN * (x2 - x1), FACE_MARGIN * (y2 - y1)
        h, w = photo.shape[:2]
        mask = np.zeros((h, w), np.uint8)
        left, top = max(0, int(x1 - grow_x)), max(0, int(y1 - grow_y))
        right, bottom = min(w, int(np.ceil(x2 + grow_x))), min(h, int(np.ceil(y2 + grow_y)))
        mask[top:bottom, left:right] = 255
        return mask

    def load_loras(self, request: GenerationRequest) -> list[LoRAFile]:
        """The request's LoRA files, read and checked against the DiT (cached between requests)."""
        if not request.loras:
            return []
        if self.lora_adapters is None or self.lora_library is None:
            raise InvalidRequestError("this pipeline was built without LoRA support")
        try:
            return [self.lora_library.load(choice) for choice in request.loras]
        except LoRAError as err:
            raise InvalidRequestError(str(err)) from None

    def injection(self, identities: list[Identity]) -> PuLIDInjection | None:
        """The DiT's ID injection for these identities (None without any: plain FLUX)."""
        if not identities:
            return None
        params = self.dit.params
        return PuLIDInjection(self.pulid_ca, identities, params.depth, params.depth_single_blocks)

    def people(self, request: GenerationRequest, notes: dict[str, str]) -> list[PersonCondition]:
        """Each person's ID tokens, weight and region at the token grid (None: the whole image),
        with where to look for their face in the result; notes say what was resized or overlaps."""
        if not request.id_images:
            return []
        if self.id_encoder is None:
            raise InvalidRequestError("this pipeline was built without an ID encoder")
        photos = [request.id_images, *(list(p.photos) for p in request.more_people)]
        weights = [request.id_weight, *(p.weight for p in request.more_people)]
        drawn = self.region_values(request, notes)
        regions: list[Tensor | None] = [None] * len(photos)
        if drawn is not None:
            regions = [token_region(values) for values in drawn]
            for number, region in enumerate(regions, start=1):
                check_region_area(region, f"Person {number}")
            overlap = overlap_share(regions) if request.layout == "masks" else 0.0
            if overlap > 0:
                notes["regions_overlap"] = (
                    f"{overlap:.0%} of the image is in more than one region: "
                    "each of those identities is added there"
                )
        people = []
        for person_photos, weight, region in zip(photos, weights, regions, strict=True):
            embedding = self.id_encoder(person_photos, with_uncond=request.uses_true_cfg)
            box = None if region is None else token_box(region, request.width)
            if region is not None and covers_everything(region):
                region = None  # the whole image: the single-person computation exactly
            on_device = None if region is None else region.to(self.device, self.dtype)
            identity = Identity.within(embedding.tokens.to(self.device), weight, on_device)
            uncond = None
            if embedding.uncond_tokens is not None:  # the same region and gathered tokens
                uncond = dataclasses.replace(identity, tokens=embedding.uncond_tokens.to(self.device))
            people.append(PersonCondition(embedding, identity, uncond, box))
        return people

    def region_values(self, request: GenerationRequest, notes: dict[str, str]) -> list[np.ndarray] | None:
        """Each person's region as (H, W) uint8 at the image's size, or None for one person over the
        whole image. Drawn regions are drawn over the photo to start from (resized to it, then
        cropped with it) or, without one, over the image (cropped to its shape as a photo is)."""
        count = 1 + len(request.more_people)
        if count == 1 and request.id_region is None:  # one person, nowhere drawn: everywhere
            return None
        if request.layout == "columns":
            return None if count == 1 else column_regions(count, request.width, request.height)
        drawn = [request.id_region, *(p.region for p in request.more_people)]
        fitted = []
        for number, region in enumerate(drawn, start=1):
            values = mask_values(region)
            if request.init_image is not None:
                values = photo_sized(values, request.init_image, notes, f"region_{number}_fit")
            values, note = fit_image(values, request.width, request.height)
            if note and request.init_image is None:
                notes[f"region_{number}_fit"] = note
            fitted.append(values)
        return fitted

    def likeness(self, people: list[PersonCondition], image: Image.Image) -> list[float | None]:
        """Each person's face similarity (:mod:`pulid.similarity`): the largest face in their region
        of the result (in all of it, for one person over the whole image)."""
        pixels = np.asarray(image)
        scores = []
        for person in people:
            where = pixels
            if person.box is not None:
                left, top, right, bottom = person.box
                where = np.ascontiguousarray(pixels[top:bottom, left:right])
            scores.append(identity_similarity(person.embedding.arcface, self.id_encoder.identity(where)))
        return scores

    @torch.inference_mode()
    def generate(
        self,
        request: GenerationRequest,
        callback: Callable[[StepInfo], None] | None = None,
        on_stage: Callable[[str], None] | None = None,
        on_image: Callable[[GeneratedImage], None] | None = None,
    ) -> GenerationResult:
        """The request's images. ``callback`` gets each denoising step (of the whole request, when
        its images are made in several passes); ``on_stage`` the name of
        each stage ("encoding the prompt", "reading the face", "decoding", ...) as it starts, and
        again between the decoder's blocks; ``on_image`` each image as soon as it is decoded. Any
        of them may raise :class:`~flux.sampling.GenerationCancelled` to stop.

        Image ``i`` has seed ``seed + i`` and is the image that seed gives alone, up to float
        rounding (batched products may sum in another order): its noise is drawn from its own
        generator, and the images of a batch share only the conditioning. Seed -1 draws one below
        :data:`~pulid.request.RANDOM_SEEDS`.
        """
        stage = on_stage or (lambda name: None)
        if self.parallel is not None:  # a cancel at any of these points stops every rank there
            stage = on_stage = _agreed(self.parallel, on_stage)
            on_image = _agreed(self.parallel, on_image)
        request = request.checked().decoded()  # files named by the request are read now
        self.check_sharding(request)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        first = request.seed if request.seed != -1 else secrets.randbelow(RANDOM_SEEDS)
        if self.parallel is not None:  # every rank denoises the same noise
            first = self.parallel.same_on_every_rank(first)
        seeds = request.seeds(first)
        if request.loras:
            stage(stages.LOADING_LORAS)
        lora_files = self.load_loras(request)
        active = [
            ActiveLoRA(lora.name, lora.layers, choice.strength)
            for lora, choice in zip(lora_files, request.loras, strict=True)
        ]
        self.check_lora_room(active)
        lora_metadata = [
            {
                "name": lora.name,
                "sha256": lora.short_hash,
                "strength": choice.strength,
                **({"ignored": lora.ignored_summary()} if lora.ignored else {}),
            }
            for lora, choice in zip(lora_files, request.loras, strict=True)
        ]

        t0 = time.perf_counter()
        stage(stages.ENCODING_PROMPT)
        cond = self.encode_prompt(request.prompt, request.max_sequence_length)
        neg_cond = (
            self.encode_prompt(request.neg_prompt, request.max_sequence_length)
            if request.uses_true_cfg
            else None
        )
        timings["text_encoding_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        notes: dict[str, str] = {}
        if request.id_images:
            stage(stages.READING_FACES if request.more_people else stages.READING_FACE)
        people = self.people(request, notes)
        timings["id_embedding_s"] = time.perf_counter() - t0
        if people and request.start_step >= request.num_steps:  # as the official code: no ID at all
            notes["id_not_used"] = (
                f"the ID start step ({request.start_step}) is not before the last of the "
                f"{request.num_steps} steps, so the face was not used: lower it"
            )

        photo_start = None
        if request.init_image is not None:
            t0 = time.perf_counter()
            stage(stages.ENCODING_PHOTO)
            photo_start, start_notes = self.start_image(request)
            notes.update(start_notes)
            timings["init_encoding_s"] = time.perf_counter() - t0

        settings = request.settings()  # once: it hashes the photo and mask to start from
        timings["denoise_s"] = timings["decode_s"] = timings["similarity_s"] = 0.0
        images: list[GeneratedImage] = []
        # With the step cache on, one image at a time: its skip decisions are made for a whole
        # batch, and each image must stay the image its seed gives alone.
        limit = 1 if request.cache_threshold > 0 else self.batch_limit()
        chunks = -(-len(seeds) // limit)
        for offset in range(0, len(seeds), limit):
            chunk = seeds[offset : offset + limit]
            t0 = time.perf_counter()
            cache = None
            if request.cache_threshold > 0:
                cache = FirstBlockCache(
                    request.cache_threshold, request.cache_full_first, request.cache_full_last
                )
            with self._loras_applied(active):
                steps = _steps_of_all(callback, offset // limit, chunks)
                latents = self._denoise(request, chunk, cond, neg_cond, people, steps, cache, photo_start)
            timings["denoise_s"] += time.perf_counter() - t0
            for seed, one in zip(chunk, latents.split(1), strict=True):
                t0 = time.perf_counter()
                stage(stages.DECODING)
                image = self.decode(one, request.height, request.width, on_block=on_stage)
                timings["decode_s"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                scores: list[float | None] = []
                if people:
                    stage(stages.MEASURING_LIKENESS)
                    scores = self.likeness(people, image)
                timings["similarity_s"] += time.perf_counter() - t0
                found = [score for score in scores if score is not None]
                score = None if len(found) < len(scores) or not found else min(found)
                metadata = {
                    **settings,
                    "seed": seed,
                    "face_similarity": describe_all(scores, bool(people)),
                    **(
                        {"loras": lora_metadata, "lora_mode": self.lora_adapters.last_mode}
                        if lora_metadata
                        else {}
                    ),
                    **({"cache_full_steps": cache_report(cache)} if cache is not None else {}),
                    **notes,
                    **self.info,
                }
                images.append(GeneratedImage(image, seed, metadata, one, score))
                if on_image is not None:
                    on_image(images[-1])
        timings["total_s"] = time.perf_counter() - start
        return GenerationResult(
            images=images,
            debug_images=[image for person in people for image in person.embedding.debug_images],
            timings=timings,
        )

    def check_sharding(self, request: GenerationRequest) -> None:
        """With the DiT's tokens split over several GPUs, refuse a size or T5 length they cannot
        share evenly."""
        if self.parallel is None:
            return
        try:
            self.parallel.check(request.max_sequence_length, request.image_tokens)
        except ShardingError as err:
            raise InvalidRequestError(str(err)) from None

    @contextlib.contextmanager
    def _loras_applied(self, active: list[ActiveLoRA]):
        """The DiT with the request's LoRAs for one denoising; under a memory placement their
        factors are freed afterwards, so the decoder's stage has the memory its plan counted on."""
        if self.lora_adapters is None or not active:
            yield
            return
        try:
            with self.lora_adapters.applied(active, merge=self.lora_merge and self.placement is None):
                yield
        finally:
            if self.placement is not None:
                self.lora_adapters.release()

    def check_lora_room(self, active: list[ActiveLoRA]) -> None:
        """Under a VRAM budget, refuse LoRAs whose factors do not fit beside the denoising stage."""
        plan = getattr(self.placement, "plan", None)
        if not active or plan is None or plan.budget is None:
            return
        need = LoRAAdapters.factor_bytes_of(active, self.dtype)
        room = plan.budget - plan.stage_peaks.get("denoise", 0)
        if need > room:
            raise InvalidRequestError(
                f"These LoRAs need {need / GiB:.2f} GiB of GPU memory while denoising and the VRAM "
                f"budget leaves {max(room, 0) / GiB:.2f} GiB beside the plan: raise --vram_budget by "
                f"{(need - room) / GiB + 0.05:.1f} GiB, or use fewer LoRAs or ones of lower rank."
            )

    def _denoise(
        self,
        request: GenerationRequest,
        seeds: list[int],
        cond: TextConditioning,
        neg_cond: TextConditioning | None,
        people: list[PersonCondition],
        callback: Callable[[StepInfo], None] | None,
        cache: FirstBlockCache | None = None,
        start: StartImage | None = None,
    ) -> Tensor:
        """Packed latents of one batch: each image's noise from its own seed, one shared condition.

        With ``start`` (a photo to start from, encoded), the schedule begins at
        :func:`~flux.sampling.image_to_image_start` for the request's strength and the latents
        there are the photo's, noised to that time with each image's own noise; the ID start step
        and the step cache count from the first step that runs. With its mask, every step keeps
        the photo's path outside the mask (:class:`~flux.sampling.Inpainting`).
        """
        noise = torch.cat(
            [
                get_noise(1, request.height, request.width, device=self.device, dtype=self.dtype, seed=s)
                for s in seeds
            ]
        )
        batch = noise.shape[0]
        timesteps = get_schedule(request.num_steps, noise.shape[-1] * noise.shape[-2] // 4, shift=True)
        img = pack(noise)
        inpainting = None
        if start is not None:
            first = image_to_image_start(request.num_steps, request.strength)
            photo = pack(start.latents).expand(batch, -1, -1)
            if start.mask is not None:
                inpainting = Inpainting(photo, img, start.mask.expand(batch, -1, -1))
            img = noised(photo, img, timesteps[first])
            timesteps = timesteps[first:]
        identities = [_batched_identity(p.identity, batch) for p in people]
        uncond_identities = [_batched_identity(p.uncond, batch) for p in people if p.uncond is not None]
        model = self.dit
        if self.parallel is not None:  # this rank's image tokens only
            model, mine = self.parallel, self.parallel.image_tokens(img.shape[1])
            identities = [identity.part(mine) for identity in identities]
            uncond_identities = [identity.part(mine) for identity in uncond_identities]
            callback = _agreed(self.parallel, callback)
        return denoise(
            model,
            img,
            image_ids(batch, noise.shape[-2], noise.shape[-1], self.device),
            cond.expand(batch),
            timesteps,
            guidance=request.guidance,
            neg_cond=None if neg_cond is None else neg_cond.expand(batch),
            true_cfg=request.true_cfg,
            cfg_start_step=request.cfg_start_step,
            id_injection=self.injection(identities),
            neg_id_injection=self.injection(uncond_identities),
            id_start_step=request.start_step,
            callback=callback,
            step_cache=cache,
            inpainting=inpainting,
        )


@dataclass(frozen=True)
class PersonCondition:
    """One person of a request: their embedding (for the likeness), their identity for the
    injection (ID tokens, weight and region at the token grid on the pipeline's device, made once
    per request) and its unconditional twin for true CFG, and the pixel box (left, top, right,
    bottom) of their region, where their face is looked for in the result (None: the whole image)."""

    embedding: IDEmbedding
    identity: Identity
    uncond: Identity | None
    box: tuple[int, int, int, int] | None


@dataclass(frozen=True)
class StartImage:
    """A photo to start from: its latents (1, 16, h, w), and where to repaint as packed tokens
    (1, L, 64) in [0, 1], or None to repaint everything."""

    latents: Tensor
    mask: Tensor | None


def latent_mask(values: np.ndarray) -> Tensor:
    """A (H, W) uint8 mask at the image's size -> the packed mask of the latents (1, L, 64).

    Pixels of 128 and above repaint. Each latent pixel gets the share of its 8x8 patch that
    repaints, then a 3x3 average feathers the edge by one latent pixel (8 image pixels) each way;
    latent pixels further than that from any painted pixel are exactly 0 (kept).
    """
    painted = torch.from_numpy((values >= 128).astype(np.float32))[None, None]
    share = F.avg_pool2d(painted, 8)
    feathered = F.avg_pool2d(share, 3, stride=1, padding=1, count_include_pad=False)
    return pack(feathered.expand(-1, LATENT_CHANNELS, -1, -1))


def token_box(region: Tensor, width: int) -> tuple[int, int, int, int]:
    """The pixel box (left, top, right, bottom) of the tokens a region reaches, for an image
    ``width`` pixels wide."""
    columns = width // TOKEN_PIXELS
    reached = (region.reshape(-1, columns) > 0).nonzero()
    rows, cols = reached[:, 0], reached[:, 1]
    return (
        int(cols.min()) * TOKEN_PIXELS,
        int(rows.min()) * TOKEN_PIXELS,
        (int(cols.max()) + 1) * TOKEN_PIXELS,
        (int(rows.max()) + 1) * TOKEN_PIXELS,
    )


def photo_sized(values: np.ndarray, photo: np.ndarray, notes: dict[str, str], key: str) -> np.ndarray:
    """A mask drawn over ``photo`` (H, W) at the photo's size: nearest-neighbour resized when it is
    not, with a note under ``key``."""
    photo_h, photo_w = photo.shape[:2]
    if values.shape == (photo_h, photo_w):
        return values
    notes[key] = f"resized from {values.shape[1]}x{values.shape[0]} to the photo's {photo_w}x{photo_h}"
    return np.asarray(Image.fromarray(values).resize((photo_w, photo_h), Image.Resampling.NEAREST))


def describe_all(scores: list[float | None], has_reference: bool) -> str:
    """The face similarity as the metadata shows it: one person's score, or each person's in order
    ("0.71 / 0.64 / no face found")."""
    if len(scores) <= 1:
        return describe(scores[0] if scores else None, has_reference)
    return " / ".join(describe(score, True) for score in scores)


def fit_image(image: np.ndarray, width: int, height: int) -> tuple[np.ndarray, str]:
    """``image`` at ``width`` x ``height``: centre-cropped to that aspect ratio (nothing is
    stretched), then resized with Lanczos. Returns it and a note of what was done ("" if nothing)."""
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image, ""
    if w * height > h * width:  # wider than asked: keep the middle columns
        crop_w, crop_h = max(1, round(h * width / height)), h
    else:
        crop_w, crop_h = w, max(1, round(w * height / width))
    left, top = (w - crop_w) // 2, (h - crop_h) // 2
    cropped = Image.fromarray(np.ascontiguousarray(image[top : top + crop_h, left : left + crop_w]))
    resized = np.asarray(cropped.resize((width, height), Image.Resampling.LANCZOS))
    cut = f"cropped from {w}x{h} to {crop_w}x{crop_h} and " if (crop_w, crop_h) != (w, h) else ""
    return resized, f"{cut}resized to {width}x{height}"


def cache_report(cache: FirstBlockCache) -> str:
    """ "21 of 28": of the steps that ran (fewer than ``num_steps`` when starting from a photo),
    those whose DiT ran in full, for the metadata and the result's text."""
    full = cache.full_passes()
    return f"{full} of {full + cache.reused_passes()}"


def _steps_of_all(
    callback: Callable[[StepInfo], None] | None, chunk: int, chunks: int
) -> Callable[[StepInfo], None] | None:
    """The step callback of one of a request's ``chunks`` denoising passes (its images made in
    turns), counting the request's steps as a whole: the second of two 28-step passes reports
    steps 28 to 55 of 56, so a progress bar never goes back between images."""
    if callback is None or chunks == 1:
        return callback

    def step(info: StepInfo) -> None:
        callback(dataclasses.replace(info, step=chunk * info.total + info.step, total=chunks * info.total))

    return step


def _agreed(parallel: SequenceParallelFlux, callback: Callable[[Any], None] | None) -> Callable[[Any], None]:
    """A callback of one rank of a split generation (a step, a stage, an image): a cancel on any
    rank (its callback raising :class:`~flux.sampling.GenerationCancelled`, or failing) stops every
    rank at the same call, so none is left waiting in a collective; the rank whose callback failed
    raises its error, the others a cancel. Every rank calls it at the same points,
    whether or not it has a callback of its own."""

    def agreed(value: Any) -> None:
        failure: Exception | None = None
        try:
            if callback is not None:
                callback(value)
        except Exception as err:  # a cancel, or a failure (an image that cannot be saved): all stop
            failure = err
        if parallel.any_rank(failure is not None):
            raise failure or GenerationCancelled()

    return agreed


def _batched_identity(identity: Identity, batch: int) -> Identity:
    """An identity with its tokens for each image of a batch (its region is shared)."""
    return dataclasses.replace(identity, tokens=_batched(identity.tokens, batch))


def _batched(tokens: Tensor, batch: int) -> Tensor:
    """One request's ID tokens (1, 32, C) for each image of a batch (a view, no copy)."""
    return tokens if tokens.shape[0] == batch else tokens.expand(batch, -1, -1)
