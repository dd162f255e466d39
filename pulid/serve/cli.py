"""Generate images from the command line, without a browser, through the same API as the app.

Started by ``generate.py`` or the ``pulid-flux-generate`` command:

    python generate.py --preset tiny-random --id_image example_inputs/astronaut.png \\
        --prompt "portrait, color, cinematic" --seed 1 --seed 2 --out outputs/

    python generate.py --id_image me.jpg --prompt "..." --speed_lora FLUX.1-Turbo-Alpha   # 8 steps
    python generate.py --id_image me.jpg --person friend.jpg --prompt "two friends on a beach"
    python generate.py --id_image me.jpg --prompt "..." --lora my-style.safetensors:0.8 \\
        --lora owner/repo/other.safetensors:0.5        # models/loras/, a path, or the hub

    torchrun --nproc-per-node 2 generate.py --sequence_parallel --id_image me.jpg --prompt "..."

Every (prompt, seed) pair becomes ``--num_images`` images (seeds seed, seed+1, ...) in ``--out``
with the settings in their metadata; each line printed gives the file, the seed and the face
similarity (see pulid/similarity.py). Models load once for the whole batch. Prompts can also come
from a text file, one per line. Without ``--id_image`` the images are plain FLUX.1-dev, and it
says so. The setting flags (``--width``, ``--num_steps``...) are made from the same declaration as
the app's controls.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pulid.catalogue import SPEED_LORAS
from pulid.outputs import writable_folder_problem
from pulid.request import PERSON_WEIGHT
from pulid.serve.startup import (
    Parser,
    add_model_arguments,
    exit_on_conflicts,
    load_or_exit,
    lora_folder,
    path_argument,
    path_text,
)

REPEATABLE = ("prompt", "seed")  # a batch is every prompt with every seed


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per declared generation setting (its official spelling too), checked on use."""
    from pulid.request import generation_settings

    group = parser.add_argument_group("generation settings")
    for setting in generation_settings():
        flags = [f"--{setting.name}", *setting.flags]
        help_text = f"{setting.label}: {setting.describe_range()}"
        if setting.name in REPEATABLE:
            group.add_argument(*flags, action="append", default=[], help=f"{help_text} (repeatable)")
        else:  # None = not given: :func:`fill_setting_defaults` tells it from a value given
            group.add_argument(*flags, default=None, help=f"{help_text} (default {setting.default})")


def fill_setting_defaults(args: argparse.Namespace, defaults: dict[str, object]) -> None:
    """Each setting not given on the command line gets ``defaults``' value, else its declared one
    (argparse's own default could not tell ``--num_step 20`` or an alias from no flag at all)."""
    from pulid.request import generation_settings

    for setting in generation_settings():
        if setting.name not in REPEATABLE and getattr(args, setting.name) is None:
            setattr(args, setting.name, defaults.get(setting.name, setting.default))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    add_setting_arguments(parser)
    parser.add_argument(
        "--prompts_file",
        type=path_argument,
        help="a text file with one prompt per line (blank lines and # comments skipped)",
    )
    parser.add_argument(
        "--id_image",
        action="append",
        default=[],
        type=path_argument,
        help="photo of the person (repeat for several photos of the same person)",
    )
    parser.add_argument(
        "--init_image",
        type=path_text,
        help="a photo to start from (image to image; --strength sets how much is repainted)",
    )
    parser.add_argument(
        "--mask",
        type=path_text,
        help="with --init_image: an image, white where to repaint and black where to keep (inpainting)",
    )
    parser.add_argument(
        "--person",
        action="append",
        nargs="+",
        default=[],
        type=path_text,
        metavar="PHOTO",
        help="another person's photos (repeat for each person: persons 2, 3, 4 in order; --id_image "
        "is person 1); --layout says where each goes",
    )
    parser.add_argument(
        "--person_weight",
        action="append",
        default=[],
        metavar="WEIGHT",
        help=f"the ID weight of each --person, in order (default {PERSON_WEIGHT.default:g})",
    )
    parser.add_argument(
        "--region",
        action="append",
        default=[],
        type=path_text,
        metavar="MASK",
        help="with --layout masks: an image, white where a person stands; one per person, person 1's first",
    )
    parser.add_argument(
        "--out",
        type=path_argument,
        default=Path("outputs"),
        help="folder for the images (PNG unless --output_format says otherwise)",
    )
    lora_help = (
        "a LoRA for the transformer: a file in models/loras/, a path, a hub reference "
        "owner/repo/file.safetensors or a speed LoRA's name, with an optional :STRENGTH "
        "(default 1; repeatable, applied together)"
    )
    parser.add_argument(
        "--lora", action="append", default=[], metavar="FILE_OR_REPO[:STRENGTH]", help=lora_help
    )
    parser.add_argument(
        "--speed_lora",
        choices=sorted(SPEED_LORAS),
        default=None,
        help="an 8-step speed LoRA at its recommended strength, with its steps and guidance "
        "(unless --num_steps/--guidance are given)",
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    speed_defaults: dict[str, object] = {}
    if args.speed_lora:
        speed = SPEED_LORAS[args.speed_lora]
        args.lora.insert(0, f"{speed.name}:{speed.strength}")
        speed_defaults = {"num_steps": speed.steps, "guidance": speed.guidance}
    fill_setting_defaults(args, speed_defaults)
    if args.prompts_file:
        try:
            lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            parser.error(f"cannot read --prompts_file: {err}")
        args.prompt += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not args.prompt:
        parser.error("give at least one --prompt or a --prompts_file")
    if len(args.person_weight) > len(args.person):
        parser.error(f"{len(args.person_weight)} --person_weight for {len(args.person)} --person")
    if len(args.region) > 1 + len(args.person):  # the people: --id_image's, then each --person's
        parser.error(f"{len(args.region)} --region for {1 + len(args.person)} people: give one per person")
    if problem := writable_folder_problem(args.out, "--out"):
        parser.error(problem)
    args.seed = args.seed or ["-1"]
    try:
        args.requests = requests_of(args)
    except ValueError as err:  # InvalidRequestError (names the setting) or ImageError (names the file)
        parser.error(str(err))
    if problem := repeated_seeds(args.requests):
        parser.error(problem)
    return args


def repeated_seeds(requests: list) -> str | None:
    """Two --seed values whose images overlap (each request makes seeds seed .. seed + n - 1): the
    batch would make the same images twice."""
    made: dict[tuple[str, int], int] = {}
    for request in requests:
        if request.seed < 0:  # random
            continue
        for seed in request.seeds(request.seed):
            first = made.setdefault((request.prompt, seed), request.seed)
            if first != request.seed:
                return (
                    f"--seed {first} and --seed {request.seed} with --num_images {request.num_images} both "
                    f"make seed {seed}: give seeds at least {request.num_images} apart."
                )
    return None


def images_of(args: argparse.Namespace) -> dict:
    """The batch's images, as the files the flags name (a local user may name any regular file):
    the request fields ``id_images``, ``init_image``, ``mask``, ``more_people`` and ``id_region``."""
    from pulid.images import ImageFile
    from pulid.request import Person

    def file(path):
        return None if path is None else ImageFile(path)

    regions = [file(path) for path in args.region] + [None] * (1 + len(args.person) - len(args.region))
    weights = args.person_weight + [PERSON_WEIGHT.default] * (len(args.person) - len(args.person_weight))
    people = tuple(
        Person(tuple(file(path) for path in paths), weight, region)
        for paths, weight, region in zip(args.person, weights, regions[1:], strict=True)
    )
    return dict(
        id_images=[file(path) for path in args.id_image],
        init_image=file(args.init_image),
        mask=file(args.mask),
        more_people=people,
        id_region=regions[0],
    )


def requests_of(args: argparse.Namespace) -> list:
    """Every (prompt, seed) request of the batch, whole (settings and image files) and checked
    before any model loads."""
    from pulid.loras import parse_lora_option
    from pulid.request import GenerationRequest, generation_settings

    shared = {s.name: getattr(args, s.name) for s in generation_settings() if s.name not in REPEATABLE}
    loras = [parse_lora_option(text) for text in args.lora]
    images = images_of(args)
    return [
        GenerationRequest.from_values(prompt=prompt, seed=seed, loras=loras, **shared, **images)
        for prompt in args.prompt
        for seed in args.seed
    ]


def read_once(requests: list) -> list:
    """The batch with its image files read, once for all its requests (they share them): a mask
    that paints nothing is refused now, before any model loads."""
    import dataclasses

    from pulid.request import IMAGE_FIELDS

    pixels = requests[0].decoded()
    shared = {name: getattr(pixels, name) for name in IMAGE_FIELDS}
    return [dataclasses.replace(request, **shared) for request in requests]


def progress_bar(prefix: str):
    def show(info) -> None:
        done = info.step + 1
        bar = "#" * (20 * done // info.total)
        end = "\n" if done == info.total else ""
        print(f"\r{prefix} [{bar:<20}] {done}/{info.total}", end=end, file=sys.stderr, flush=True)

    return show


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    exit_on_conflicts(args)
    from flux.errors import UserError
    from flux.lora import LoRAError
    from pulid.loras import check_fetchable_lora, check_lora_for, locate_lora

    try:
        args.requests = read_once(args.requests)
    except UserError as err:  # a file that cannot be read, a mask that paints nothing
        print(err, file=sys.stderr)
        return 2
    try:  # each LoRA is where it is said to be and fits the DiT, before minutes of loading (fetching
        # one waits for the models); the tiny preset loads in seconds and writes its example LoRAs
        for choice in args.requests[0].loras if args.preset is None else ():
            if isinstance(found := locate_lora(choice.source, lora_folder(args)), Path):
                check_lora_for(found, args.name)
            else:  # a speed LoRA or a hub reference: here already, or it can be fetched
                check_fetchable_lora(choice.source, found, lora_folder(args).parent)
    except LoRAError as err:
        print(f"--lora: {err}", file=sys.stderr)
        return 2
    if not args.id_image:
        print("no --id_image: the images are plain FLUX.1-dev, with nobody's identity", file=sys.stderr)
    pipeline = load_or_exit(args)
    from pulid.serve.ranks import leads, leave_group

    writes = leads()  # under torchrun --sequence_parallel every rank runs the batch; rank 0 writes it
    try:
        return generate_all(args, pipeline, writes)
    finally:
        leave_group()


def generate_all(args: argparse.Namespace, pipeline, writes: bool) -> int:
    """Generate and (where ``writes``) save every request of the command line; 1 if any failed."""
    from flux.errors import UserError
    from pulid.outputs import save_new_image

    failures, saved = 0, 0
    for index, request in enumerate(args.requests):
        label = f"request {index + 1}/{len(args.requests)}"  # a prompt and a seed: --num_images each
        try:
            result = pipeline.generate(request, callback=progress_bar(label) if writes else None)
        except UserError as err:
            if writes:
                seed = "a random seed" if request.seed < 0 else f"seed {request.seed}"
                print(f"{label} ({request.prompt!r}, {seed}): {err}", file=sys.stderr)
            failures += 1
            continue
        if not writes:
            continue
        for image in result.images:
            saved += 1
            path = save_new_image(
                image.image, image.metadata, args.out, saved, request.output_format, request.quality
            )
            likeness = image.metadata["face_similarity"]  # the score, or why there is none
            extras = "".join(
                f"  lora={lora['name']}:{lora['strength']:g}" for lora in image.metadata.get("loras", [])
            )
            if "cache_full_steps" in image.metadata:  # "21 of 28": the step cache's work
                extras += f"  full_steps={image.metadata['cache_full_steps'].replace(' of ', '/')}"
            print(
                f"{path}  seed={image.seed}  face_similarity={likeness}{extras}  "
                f"{result.timings['total_s']:.1f}s"
            )
    return 1 if failures else 0


def run() -> None:
    """:func:`main` as a command, its return value the exit status. Ctrl+C is one line; the
    images already written stay."""
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("\nStopped.", file=sys.stderr)
        raise SystemExit(130) from None
