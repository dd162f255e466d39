"""What one image depends on: the generation settings, declared once, with the official defaults.

:class:`GenerationRequest` is the declaration (:mod:`pulid.settings`): each field carries its
type, default, range, label and help. The app's controls, ``generate.py``'s flags, the request
validation and the PNG metadata are made from it, so a setting is added or changed here only.
Defaults and ranges are the official PuLID-FLUX demo's (28 steps, 896x1152, guidance 4, ID from
step 0, T5 length 128, true CFG 1); the step slider goes to 50.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flux.conventions import T5_MAX_LENGTHS, TOKEN_PIXELS, uses_true_cfg
from pulid.images import ImageFile, ImageSource, at_first_size, mask_pixels, photo_pixels
from pulid.limits import (
    MAX_EXTRA_PHOTOS,
    MAX_IMAGES_PER_REQUEST,
    MAX_LORA_STRENGTH,
    MAX_LORAS_PER_REQUEST,
    MAX_PEOPLE,
    MAX_PROMPT_CHARS,
)
from pulid.outputs import EXTENSIONS
from pulid.regions import LAYOUTS
from pulid.settings import InvalidRequestError, Setting, coerce_all, declared_settings, setting

MAX_SEED = 2**64 - 1
RANDOM_SEEDS = 2**32  # a random seed is drawn below this: at most 10 digits, to read and type
OUTPUT_FORMATS = tuple(EXTENSIONS)  # png, jpeg, webp
# Common sizes near one megapixel, multiples of 16 (the UI's picker sets width and height).
SIZE_PRESETS = {
    "896 x 1152 (7:9 portrait, the official default)": (896, 1152),
    "1024 x 1024 (square)": (1024, 1024),
    "832 x 1216 (2:3 portrait)": (832, 1216),
    "1216 x 832 (3:2 landscape)": (1216, 832),
    "768 x 1344 (9:16 portrait)": (768, 1344),
    "1344 x 768 (16:9 landscape)": (1344, 768),
    "512 x 512 (small, fast)": (512, 512),
}
DEFAULT_PROMPT = "portrait, color, cinematic"
DEFAULT_NEGATIVE_PROMPT = "bad quality, worst quality, text, signature, watermark, extra limbs"

START_STEP_HELP = (
    "The step from which the face is inserted (the official app's 'timestep to start inserting ID'). "
    "Smaller keeps the face closer, larger leaves more room for the prompt; 0-4 works best "
    "(4 for photorealistic scenes, 0-1 for stylised ones)."
)
CACHE_HELP = (
    "0 is off. Above 0, steps whose first DiT block barely changed skip the other blocks (First-Block "
    "Cache, the ID included); 0.08 is the usual choice, higher is faster and further from the "
    "uncached image. The result says how many steps ran in full."
)
MAX_CACHE_THRESHOLD = 0.5
STRENGTH_HELP = (
    "With a photo to start from: how much of it is repainted. 1 ignores it (text to image); 0.5-0.8 "
    "keeps its layout and colours; lower keeps more. The steps run are this share of the steps."
)
REPAINT_HELP = (
    "With a photo to start from: 'mask' repaints the mask given (all of the photo without one); "
    "'face' repaints the largest face found in the photo, its box grown by a quarter on each side."
)
LAYOUT_HELP = (
    "With several people: 'columns' puts them side by side in their order, left to right; 'masks' "
    "puts each in the region drawn or uploaded for them (regions that overlap give both identities)."
)
TRUE_CFG_HELP = (
    "1 uses FLUX's distilled guidance (faster, usually best); above 1 runs a second pass with the "
    "negative prompt (then set guidance near 1)."
)

# The strength of one LoRA (declared once: the UI's sliders, the CLI's check, the request's).
LORA_STRENGTH = Setting(
    float,
    1.0,
    "LoRA strength",
    minimum=-MAX_LORA_STRENGTH,
    maximum=MAX_LORA_STRENGTH,
    step=0.05,
    help="1 as trained; lower to soften, negative to push away from what it learned.",
    name="lora_strength",
)
MAX_LORA_SOURCE_CHARS = 500
# The fields that hold a request's images (arrays or files): the rest are its settings and LoRAs.
IMAGE_FIELDS = ("id_images", "init_image", "mask", "more_people", "id_region")

__all__ = [
    "GenerationRequest",
    "InvalidRequestError",
    "LoRAChoice",
    "MAX_SEED",
    "RANDOM_SEEDS",
    "Person",
    "generation_settings",
]


@dataclass(frozen=True)
class LoRAChoice:
    """One LoRA of a request: where it comes from and how strongly it applies (negative inverts it)."""

    source: str
    strength: float = 1.0


@dataclass(frozen=True)
class Person:
    """Another person in the image: photos of their face (RGB uint8 or image files, averaged into
    one identity as the ID photos are), their ID weight, and their region (a mask, white where they
    stand) for the 'masks' layout."""

    photos: tuple[ImageSource, ...]
    weight: float = 1.0
    region: ImageSource | None = None


@dataclass
class GenerationRequest:
    """Everything one image depends on: the photos of the person and every generation setting."""

    prompt: str = setting(
        str,
        DEFAULT_PROMPT,
        "Prompt",
        required=True,
        max_length=MAX_PROMPT_CHARS,
        widget="textbox",
        help="What the image shows; the person is the one in the ID photos.",
    )
    # The person's photos: RGB uint8 arrays or image files (read when the request is decoded).
    id_images: list[ImageSource] = field(default_factory=list)
    # LoRAs for the DiT, each with its strength (:mod:`pulid.loras`); applied for this request only.
    loras: tuple[LoRAChoice, ...] = ()
    id_weight: float = setting(
        float,
        1.0,
        "ID weight",
        minimum=0.0,
        maximum=3.0,
        step=0.05,
        help="How strongly the face is imposed; 0 turns the identity off.",
    )
    width: int = setting(int, 896, "Width", minimum=256, maximum=1536, step=16, multiple_of=16, group="image")
    height: int = setting(
        int, 1152, "Height", minimum=256, maximum=1536, step=16, multiple_of=16, group="image"
    )
    num_steps: int = setting(
        int,
        28,
        "Number of steps",
        minimum=1,
        maximum=50,
        step=1,
        group="image",
        help="Denoising steps: more is slower and usually finer.",
    )
    start_step: int = setting(int, 0, "ID start step", minimum=0, maximum=10, step=1, help=START_STEP_HELP)
    cache_threshold: float = setting(
        float,
        0.0,
        "Step cache (faster): threshold",
        minimum=0.0,
        maximum=MAX_CACHE_THRESHOLD,
        step=0.01,
        group="image",
        help=CACHE_HELP,
    )
    guidance: float = setting(
        float,
        4.0,
        "Guidance",
        minimum=1.0,
        maximum=10.0,
        step=0.1,
        group="image",
        help="FLUX's distilled guidance: higher follows the prompt more literally.",
    )
    seed: int = setting(
        int,
        -1,
        "Seed (-1 for random)",
        minimum=-1,
        maximum=MAX_SEED,
        widget="textbox",
        help="The same seed and settings give the same image.",
    )
    num_images: int = setting(
        int,
        1,
        "Number of images",
        minimum=1,
        maximum=MAX_IMAGES_PER_REQUEST,
        step=1,
        help="Made together, with seeds seed, seed+1, ...: each is the image its own seed gives alone "
        "(up to float rounding).",
    )
    max_sequence_length: int = setting(
        int,
        128,
        "T5 max sequence length",
        choices=T5_MAX_LENGTHS,
        step=128,
        group="advanced",
        help="Prompt tokens T5 reads: longer prompts need more, 128 is fastest.",
    )
    neg_prompt: str = setting(
        str,
        DEFAULT_NEGATIVE_PROMPT,
        "Negative prompt",
        max_length=MAX_PROMPT_CHARS,
        widget="textbox",
        group="advanced",
        help="Used only with true CFG above 1.",
    )
    true_cfg: float = setting(
        float,
        1.0,
        "True CFG scale",
        minimum=1.0,
        maximum=10.0,
        step=0.1,
        group="advanced",
        help=TRUE_CFG_HELP,
    )
    cfg_start_step: int = setting(
        int,
        1,
        "True CFG start step",
        minimum=0,
        maximum=20,
        step=1,
        group="dev",
        flags=("--timestep_to_start_cfg",),
        help="First step of the negative pass of true CFG (the official 'timestep to start CFG').",
    )
    cache_full_first: int = setting(
        int,
        1,
        "Step cache: first steps always in full",
        minimum=1,
        maximum=10,
        step=1,
        group="dev",
        help="Steps at the start that the step cache never skips.",
    )
    cache_full_last: int = setting(
        int,
        1,
        "Step cache: last steps always in full",
        minimum=0,
        maximum=10,
        step=1,
        group="dev",
        help="Steps at the end that the step cache never skips.",
    )
    output_format: str = setting(
        str,
        "png",
        "Output format",
        choices=OUTPUT_FORMATS,
        widget="radio",
        group="output",
        help="PNG is lossless; JPEG and WebP are smaller. All keep the prompt and settings.",
    )
    quality: int = setting(int, 95, "JPEG/WebP quality", minimum=50, maximum=100, step=1, group="output")
    # Declared last so that the app's API keeps its earlier parameters' positions.
    strength: float = setting(
        float,
        0.8,
        "Image-to-image strength",
        minimum=0.01,
        maximum=1.0,
        step=0.01,
        group="edit",
        help=STRENGTH_HELP,
    )
    repaint: str = setting(
        str, "mask", "Repaint", choices=("mask", "face"), widget="radio", group="edit", help=REPAINT_HELP
    )
    layout: str = setting(
        str,
        "columns",
        "Where each person goes",
        choices=LAYOUTS,
        widget="radio",
        group="people",
        help=LAYOUT_HELP,
    )
    # A photo to start from (RGB uint8 or a file): image to image (see :meth:`PuLIDFluxPipeline.generate`).
    init_image: ImageSource | None = None
    # With a photo to start from: where to repaint (see :func:`mask_values`); the rest is kept.
    mask: ImageSource | None = None
    # Several people: the others besides the one in ``id_images`` (see :mod:`pulid.regions`), and,
    # with the 'masks' layout, the first person's region.
    more_people: tuple[Person, ...] = ()
    id_region: ImageSource | None = None

    @classmethod
    def from_values(
        cls,
        id_images: list | None = None,
        loras: Any = (),
        init_image: Any = None,
        mask: Any = None,
        more_people: Any = (),
        id_region: Any = None,
        **values: Any,
    ) -> GenerationRequest:
        """The request every front door builds (the page, the CLI, the HTTP API, Python): raw setting
        values (strings, JSON numbers) and its images (arrays or :class:`~pulid.images.ImageFile`),
        validated once by :meth:`checked`."""
        raw = cls(
            id_images=id_images if id_images is not None else [],
            loras=loras,
            init_image=init_image,
            mask=mask,
            more_people=more_people if more_people is not None else (),
            id_region=id_region,
            **coerce_all(generation_settings(), values),
        )
        return raw.checked()

    @property
    def image_tokens(self) -> int:
        """How many image tokens the DiT sees: one per 16 x 16 pixels."""
        return (self.width // TOKEN_PIXELS) * (self.height // TOKEN_PIXELS)

    @property
    def uses_true_cfg(self) -> bool:
        return uses_true_cfg(self.true_cfg)

    def checked(self) -> GenerationRequest:
        """This request with every setting coerced to its type and every image checked, or
        :class:`InvalidRequestError` naming what is not allowed. The request itself is not changed.
        Image files are checked from their headers only (:class:`ImageError`); their pixels are read
        by :meth:`decoded`."""
        values = coerce_all(
            generation_settings(), {s.name: getattr(self, s.name) for s in generation_settings()}
        )
        if not isinstance(self.id_images, (list, tuple)) or any(
            not isinstance(image, (np.ndarray, ImageFile)) for image in self.id_images
        ):
            raise InvalidRequestError("The ID photos must be a list of images (numpy arrays or image files).")
        check_person_photo_count(1, len(self.id_images))
        checked = GenerationRequest(
            id_images=[checked_id_photo(photo) for photo in self.id_images],
            loras=checked_loras(self.loras),
            init_image=checked_init_image(self.init_image),
            mask=checked_mask(self.mask),
            more_people=checked_people(self.more_people),
            id_region=checked_region(self.id_region, "Person 1"),
            **values,
        )
        check_edit(values["repaint"], checked.init_image is not None, checked.mask is not None)
        check_people(values["layout"], checked.people_given())
        return checked

    def decoded(self) -> GenerationRequest:
        """This request with every image file read into pixels and checked as pixels (a mask that
        paints nothing is known only now): what the pipeline generates from. A request without
        files is returned as it is. A file that cannot be read raises :class:`ImageError`."""
        if not self.image_files():
            return self
        return dataclasses.replace(
            self,
            id_images=[photo_pixels(photo) for photo in self.id_images],
            init_image=checked_init_image(_pixels(self.init_image, photo_pixels)),
            mask=checked_mask(_pixels(self.mask, mask_pixels)),
            more_people=checked_people(
                tuple(
                    Person(
                        tuple(photo_pixels(photo) for photo in person.photos),
                        person.weight,
                        _pixels(person.region, mask_pixels),
                    )
                    for person in self.more_people
                )
            ),
            id_region=checked_region(_pixels(self.id_region, mask_pixels), "Person 1"),
        )

    def image_files(self) -> list[ImageFile]:
        """Every image this request names by its file, photos first: what a front door checks the
        origin of before anything reads them."""
        sources = [*self.id_images, self.init_image, self.mask, self.id_region]
        for person in self.more_people:
            sources += [*person.photos, person.region]
        return [source for source in sources if isinstance(source, ImageFile)]

    def people_given(self) -> PeopleGiven:
        """What :func:`check_people` needs to know of this request's people."""
        return PeopleGiven(
            first_has_photos=bool(self.id_images),
            first_has_region=self.id_region is not None,
            more=tuple((bool(p.photos), p.region is not None) for p in self.more_people),
        )

    def seeds(self, first: int) -> list[int]:
        """The seed of each image: ``first``, ``first + 1``, ... (wrapping past :data:`MAX_SEED`)."""
        return [(first + i) % (MAX_SEED + 1) for i in range(self.num_images)]

    def settings(self) -> dict[str, Any]:
        """The request without the photos: what the PNG metadata records."""
        values = {s.name: getattr(self, s.name) for s in generation_settings()}
        values["num_id_images"] = len(self.id_images)
        if self.init_image is not None:  # the pixels' hash: the file's path is the visitor's business
            values["init_image"] = _pixel_hash(self.init_image)
        if self.mask is not None:
            values["mask"] = _pixel_hash(mask_values(self.mask))
        if self.more_people or self.id_region is not None:
            values["people"] = self.people_metadata()
        return values

    def people_metadata(self) -> list[dict[str, Any]]:
        """Each person's photo count, weight and region (a hash, or the preset's column)."""
        people = [(len(self.id_images), self.id_weight, self.id_region)]
        people += [(len(p.photos), p.weight, p.region) for p in self.more_people]
        described = []
        for index, (photos, weight, region) in enumerate(people):
            if self.layout == "columns":
                where = f"column {index + 1} of {len(people)}" if len(people) > 1 else "the whole image"
            else:
                where = _pixel_hash(mask_values(region)) if region is not None else "none"
            described.append({"photos": photos, "weight": weight, "region": where})
        return described


def _pixel_hash(pixels: np.ndarray) -> str:
    """A short hash of an image's pixels: the metadata names inputs by content, never by path."""
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()[:16]


def size_for_photo(photo_width: int, photo_height: int, pixels: int) -> tuple[int, int]:
    """An allowed image size with the photo's aspect ratio and about ``pixels`` pixels: what the
    app sets when a photo to start from is chosen, so that nothing of it is cropped away. Sizes
    are rounded to the declared multiple and kept in the declared range (a very long or tall
    photo then loses a little at its ends)."""
    declared = {s.name: s for s in generation_settings()}
    low, high = declared["width"].minimum, declared["width"].maximum
    step = declared["width"].multiple_of
    aspect = photo_width / photo_height
    width = (pixels * aspect) ** 0.5
    height = width / aspect
    scale = max(1.0, low / min(width, height))  # up to the smallest side allowed ...
    scale = min(scale, high / max(width, height))  # ... but never past the largest
    width, height = width * scale, height * scale
    return tuple(int(min(high, max(low, step * round(side / step)))) for side in (width, height))


def _pixels(source: ImageSource | None, decode) -> np.ndarray | None:
    return None if source is None else decode(source)


def checked_file(image: ImageFile) -> ImageFile:
    """An image file whose header is readable and within the limits (else :class:`ImageError`)."""
    image.check()
    return image


def checked_id_photo(photo: ImageSource) -> ImageSource:
    """An ID photo: a file with a readable header, or an array (its shape is the face analyser's to
    judge, which says "no face" for an image without one)."""
    return checked_file(photo) if isinstance(photo, ImageFile) else photo


def checked_init_image(image: Any) -> ImageSource | None:
    """``image`` if it is None, a readable image file or an RGB image (H, W, 3) of uint8, else
    :class:`InvalidRequestError`."""
    if image is None:
        return None
    if isinstance(image, ImageFile):
        return checked_file(image)
    if checked_photo(image) is None:
        raise InvalidRequestError(
            "The photo to start from must be an image (an RGB array of height x width x 3 bytes)."
        )
    return image


def mask_values(mask: np.ndarray) -> np.ndarray:
    """A mask as (H, W) uint8, 255 where to repaint: a grey image as it is, true for booleans, the
    brightest channel of a colour image (white or any paint repaints), the alpha of an RGBA one
    (strokes on a transparent layer)."""
    if mask.dtype == np.bool_:
        return mask.astype(np.uint8) * 255
    if mask.ndim == 3:
        return mask[..., 3] if mask.shape[2] == 4 else mask.max(axis=2)
    return mask


def painted_mask(layers: list[np.ndarray]) -> np.ndarray | None:
    """The union of painted layers (RGBA (H, W, 4), as drawn in the page) as one mask, their
    opacity at the first layer's size; None when nothing is painted (no pixel reaches 128)."""
    if not layers:
        return None
    union = np.max([layer[..., 3] for layer in at_first_size(layers)], axis=0)
    return union if (union >= 128).any() else None


def checked_mask(mask: Any) -> ImageSource | None:
    """``mask`` if it is None, a readable image file (whether it paints something is known once it
    is read), or an image (H, W), (H, W, 1/3/4) of uint8 or bool that repaints something; else
    :class:`InvalidRequestError` saying what to do."""
    if mask is None:
        return None
    if isinstance(mask, ImageFile):
        return checked_file(mask)
    shaped = isinstance(mask, np.ndarray) and (
        mask.ndim == 2 or (mask.ndim == 3 and mask.shape[2] in (1, 3, 4))
    )
    if not shaped or mask.dtype not in (np.uint8, np.bool_) or 0 in mask.shape:
        raise InvalidRequestError("The mask must be an image: white where to repaint, black where to keep.")
    if not (mask_values(mask) >= 128).any():
        raise InvalidRequestError(
            "The mask is empty, so nothing would be repainted: paint the region to repaint in white."
        )
    return mask


def check_edit(repaint: str, has_photo: bool, has_mask: bool) -> None:
    """What to repaint agrees with what was given: a mask, or repainting the face, needs a photo
    to start from, and the two do not go together. :class:`InvalidRequestError` otherwise."""
    if has_mask and not has_photo:
        raise InvalidRequestError(
            "A mask needs a photo to start from: it says which part of that photo to repaint."
        )
    if repaint == "face" and not has_photo:
        raise InvalidRequestError(
            "Repainting the face needs a photo to start from: add one, or choose 'mask'."
        )
    if repaint == "face" and has_mask:
        raise InvalidRequestError(
            "Give a mask or repaint the face, not both: remove the mask, or choose 'mask'."
        )


@dataclass(frozen=True)
class PeopleGiven:
    """Who is in a request, for :func:`check_people`: whether the first person has photos and a
    region, and (has photos, has a region) for each other person."""

    first_has_photos: bool
    first_has_region: bool
    more: tuple[tuple[bool, bool], ...] = ()


def check_people(layout: str, people: PeopleGiven) -> None:
    """The people and their regions agree with the layout; :class:`InvalidRequestError` otherwise."""
    if not people.more and not people.first_has_region:
        return  # one person (or nobody): the whole image, as ever
    check_people_count(1 + len(people.more))
    if not people.first_has_photos:
        raise InvalidRequestError(
            "Person 1 has no photo: add their ID photo (several people need a photo of each)."
        )
    for number, (has_photos, _) in enumerate(people.more, start=2):
        if not has_photos:
            raise InvalidRequestError(f"Person {number} has no photo: add one, or remove the person.")
    regions = [people.first_has_region] + [has_region for _, has_region in people.more]
    if layout == "columns" and any(regions):
        raise InvalidRequestError(
            "Regions are used with the 'masks' layout: choose 'masks', or remove the regions to put "
            "the people side by side."
        )
    if layout == "masks":
        for number, has_region in enumerate(regions, start=1):
            if not has_region:
                raise InvalidRequestError(
                    f"Person {number} has no region: draw or upload one (white where they stand), or "
                    "choose the 'columns' layout."
                )


def check_people_count(total: int) -> None:
    """At most :data:`~pulid.limits.MAX_PEOPLE` people in one image."""
    if total > MAX_PEOPLE:
        raise InvalidRequestError(f"{total} people were given; at most {MAX_PEOPLE} can be put in one image.")


def check_person_photo_count(number: int, count: int) -> None:
    """At most one ID photo and :data:`~pulid.limits.MAX_EXTRA_PHOTOS` more for each person."""
    if count <= MAX_EXTRA_PHOTOS + 1:
        return
    if number == 1:  # the app's first person: one ID photo, then "extra photos"
        raise InvalidRequestError(
            f"{count - 1} extra photos were sent; at most {MAX_EXTRA_PHOTOS} can be used: keep the best."
        )
    raise InvalidRequestError(
        f"Person {number} has {count} photos; at most {MAX_EXTRA_PHOTOS + 1} are used: keep the best."
    )


def checked_region(region: Any, who: str) -> ImageSource | None:
    """A person's region: None, a readable image file, or an image (as :func:`checked_mask` takes)
    that paints something."""
    if region is None or isinstance(region, ImageFile):
        return None if region is None else checked_file(region)
    try:
        return checked_mask(region)
    except InvalidRequestError:
        raise InvalidRequestError(
            f"{who}'s region must be an image that paints where they stand in white (it is empty "
            "or not an image)."
        ) from None


def checked_people(people: Any) -> tuple[Person, ...]:
    """The other people: each a :class:`Person` (or a (photos, weight[, region]) tuple) with RGB
    photos or image files, a weight in the ID weight's range and a region that paints something."""
    if people is None:
        return ()
    if not isinstance(people, (list, tuple)):
        raise InvalidRequestError("The other people must be a list of persons (photos, weight, region).")
    check_people_count(1 + len(people))
    out = []
    for number, item in enumerate(people, start=2):
        if isinstance(item, Person):
            photos, weight, region = item.photos, item.weight, item.region
        elif isinstance(item, (list, tuple)) and len(item) in (2, 3):
            photos, weight, region = (*item, None)[:3]
        else:
            raise InvalidRequestError(f"Person {number} must be given as (photos, weight, region).")
        if not isinstance(photos, (list, tuple)) or any(
            not isinstance(p, ImageFile) and checked_photo(p) is None for p in photos
        ):
            raise InvalidRequestError(
                f"Person {number}'s photos must be a list of RGB images or image files."
            )
        check_person_photo_count(number, len(photos))
        out.append(
            Person(
                tuple(checked_id_photo(photo) for photo in photos),
                PERSON_WEIGHT.coerce(weight),
                checked_region(region, f"Person {number}"),
            )
        )
    return tuple(out)


def checked_photo(photo: Any) -> np.ndarray | None:
    """``photo`` if it is an RGB image (H, W, 3) of uint8, else None."""
    ok = isinstance(photo, np.ndarray) and photo.ndim == 3 and photo.shape[2] == 3 and photo.dtype == np.uint8
    return photo if ok else None


def checked_loras(loras: Any) -> tuple[LoRAChoice, ...]:
    """``loras`` as LoRA choices: each a :class:`LoRAChoice` or a (source, strength) pair, with a
    source of reasonable length and a finite strength in range; at most
    :data:`~pulid.limits.MAX_LORAS_PER_REQUEST` of them."""
    if loras is None:
        return ()
    if isinstance(loras, (str, bytes)) or not isinstance(loras, (list, tuple)):
        raise InvalidRequestError("LoRAs must be a list of (source, strength) pairs.")
    if len(loras) > MAX_LORAS_PER_REQUEST:
        raise InvalidRequestError(
            f"{len(loras)} LoRAs were given; at most {MAX_LORAS_PER_REQUEST} can be stacked in one request."
        )
    out = []
    for item in loras:
        if isinstance(item, LoRAChoice):
            source, strength = item.source, item.strength
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            source, strength = item
        else:
            raise InvalidRequestError("Each LoRA must be a (source, strength) pair.")
        if not isinstance(source, str) or not source.strip():
            raise InvalidRequestError("A LoRA needs a name, a path or a hub reference.")
        if len(source) > MAX_LORA_SOURCE_CHARS:
            raise InvalidRequestError(
                f"A LoRA name is too long (at most {MAX_LORA_SOURCE_CHARS} characters)."
            )
        if any(chosen.source == source.strip() for chosen in out):  # it would apply twice over
            raise InvalidRequestError(
                f"LoRA {source.strip()[:80]!r} is chosen twice: choose it once, with the strength you want."
            )
        out.append(LoRAChoice(source.strip(), LORA_STRENGTH.coerce(strength)))
    return tuple(out)


def generation_settings() -> tuple[Setting, ...]:
    """The declared settings of :class:`GenerationRequest`, in order."""
    return _SETTINGS


_SETTINGS = declared_settings(GenerationRequest)
# The ID weight of each other person: the first person's setting under another name.
PERSON_WEIGHT = dataclasses.replace(
    next(s for s in _SETTINGS if s.name == "id_weight"), name="person_weight", label="ID weight"
)
