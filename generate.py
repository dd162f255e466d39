"""Generate images from the command line, without a browser, through the same API as the app.

    python generate.py --preset tiny-random --id_image example_inputs/astronaut.png \\
        --prompt "portrait, color, cinematic" --seed 1 --seed 2 --out outputs/

Every (prompt, seed) pair becomes one PNG in ``--out`` with the settings in its metadata. Models
load once for the whole batch. Prompts can also come from a text file, one per line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from app_flux import add_model_arguments, build_pipeline
from pulid.errors import PuLIDError
from pulid.outputs import output_name, save_png
from pulid.pipeline import GenerationRequest, InvalidRequestError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts_file", type=Path, help="a text file with one prompt per line")
    parser.add_argument(
        "--id_image",
        action="append",
        default=[],
        type=Path,
        help="photo of the person (repeat for several photos of the same person)",
    )
    parser.add_argument("--seed", action="append", type=int, default=[], help="seed (repeatable; -1 random)")
    parser.add_argument("--width", type=int, default=896)
    parser.add_argument("--height", type=int, default=1152)
    parser.add_argument("--num_steps", type=int, default=20)
    parser.add_argument("--start_step", type=int, default=0, help="step to start inserting the ID")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--id_weight", type=float, default=1.0)
    parser.add_argument("--neg_prompt", default=GenerationRequest.neg_prompt)
    parser.add_argument("--true_cfg", type=float, default=1.0)
    parser.add_argument("--timestep_to_start_cfg", type=int, default=1)
    parser.add_argument("--max_sequence_length", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="folder for the PNG files")
    args = parser.parse_args(argv)
    if args.prompts_file:
        args.prompt += [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
    if not args.prompt:
        parser.error("give at least one --prompt or a --prompts_file")
    args.seed = args.seed or [-1]
    return args


def load_photo(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


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
    photos = [load_photo(p) for p in args.id_image]
    pipeline = build_pipeline(args)
    jobs = [(prompt, seed) for prompt in args.prompt for seed in args.seed]
    failures = 0
    for index, (prompt, seed) in enumerate(jobs):
        request = GenerationRequest(
            prompt=prompt,
            id_images=photos,
            width=args.width,
            height=args.height,
            num_steps=args.num_steps,
            start_step=args.start_step,
            guidance=args.guidance,
            seed=seed,
            id_weight=args.id_weight,
            neg_prompt=args.neg_prompt,
            true_cfg=args.true_cfg,
            cfg_start_step=args.timestep_to_start_cfg,
            max_sequence_length=args.max_sequence_length,
        )
        try:
            result = pipeline.generate(request, callback=progress_bar(f"image {index + 1}/{len(jobs)}"))
        except (PuLIDError, InvalidRequestError) as err:
            print(f"image {index + 1}/{len(jobs)} ({prompt!r}, seed {seed}): {err}", file=sys.stderr)
            failures += 1
            continue
        path = save_png(result.image, result.metadata, args.out / output_name(result.metadata, index))
        print(f"{path}  seed={result.seed}  {result.timings['total_s']:.1f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
