"""Download the weight files the chosen flags need into ``models/``: ``python -m pulid.serve.download``.

    python -m pulid.serve.download --dry-run                 # what flux-dev + PuLID v0.9.1 need, and where
    python -m pulid.serve.download                           # fetch what is missing (progress, resume)
    python -m pulid.serve.download --name flux-krea-dev --version v0.9.0 --models_dir /data/models
    python -m pulid.serve.download --fp8                     # what --fp8 loads on this machine
    python -m pulid.serve.download --speed_lora FLUX.1-Turbo-Alpha   # and an 8-step LoRA into models/loras/
    python -m pulid.serve.download --dit flux-dev-Q4_K_S --t5 t5xxl-Q4_K_M --clip clip-l   # an 8 GB card

The flags are the app's (``--name``, ``--version``, ``--fp8``, ``--fp8_mode``, ``--dit``, ``--t5``,
``--clip``, ``--models_dir``), so the same line that starts the app says what to download. Files
already in the models folder or the Hugging Face cache are skipped. FLUX.1-dev is gated: accept its
licence on the hub and set ``HF_TOKEN`` (or run ``hf auth login``) first; a refused download says
so. Interrupted downloads resume where they stopped."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

from flux.hub import (
    WeightsNotFoundError,
    download,
    download_blocked,
    find_local,
    format_size,
    local_problem,
)
from pulid.catalogue import (
    CATALOGUE,
    SINGLE_FILE_ROLES,
    SPEED_LORAS,
    WeightChoiceError,
    default_models_dir,
    is_path_choice,
    required_weights,
)
from pulid.serve.startup import Parser, add_weight_arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The download command's flags: the app's weight flags, plus what to fetch and how."""
    parser = Parser(
        prog="python -m pulid.serve.download",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    add_weight_arguments(parser)
    parser.add_argument(
        "--speed_lora",
        action="append",
        default=[],
        choices=sorted(SPEED_LORAS),
        help="also fetch this 8-step speed LoRA into models/loras/ (repeatable)",
    )
    parser.add_argument("--all", action="store_true", help="every file of the catalogue, for every flag")
    parser.add_argument(
        "--dry-run", action="store_true", help="list the files, sizes and places; fetch nothing"
    )
    return parser.parse_args(argv)


def chosen_entries(args: argparse.Namespace):
    """The catalogue entries the flags need (``--fp8 --fp8_mode auto`` resolved on this machine)."""
    if args.all:
        return list(CATALOGUE)
    fp8 = args.fp8_mode if args.fp8 else None
    if fp8 == "auto":  # as the app would decide on this machine
        from flux.devices import resolve_device
        from pulid.loading import resolve_fp8_mode

        fp8 = resolve_fp8_mode(fp8, resolve_device(None))
        print(f"--fp8_mode auto on this machine is {fp8}")
    files = {"dit": args.dit, "t5": args.t5, "clip": args.clip}
    needed = required_weights(args.name, args.version, fp8, files)
    for kind, value in files.items():  # a file given as a path is the user's: checked, not fetched
        if is_path_choice(kind, value):
            if not Path(value).expanduser().is_file():
                raise WeightChoiceError(f"--{kind} {value}: there is no such file.")
            del needed[SINGLE_FILE_ROLES[kind]]
    asked = dict.fromkeys(args.speed_lora)  # each once, in the order given
    # a speed LoRA is optional to the app, but not to the user who asks for it here
    speed = [
        replace(SPEED_LORAS[name].entry, weights=replace(SPEED_LORAS[name].entry.weights, optional=False))
        for name in asked
    ]
    return list(needed.values()) + speed


def main(argv: list[str] | None = None) -> int:
    """Plan and fetch; the exit status (0 done, 1 a download failed or was blocked, 2 flags that cannot go
    together)."""
    try:
        return _main(argv)
    except BrokenPipeError:  # the listing piped into `head`, which closed early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("\nStopped; files already fetched stay, and a rerun resumes the rest.", file=sys.stderr)
        return 130


DISK_MARGIN_BYTES = 2 * 10**9  # left free beyond the files: the system and partial downloads need room


def disk_shortfall(folder: Path, needed: int) -> str | None:
    """Why ``needed`` bytes will not fit on the disk that holds (or will hold) ``folder``; None if
    they fit. Checked before anything is fetched: a full disk half-way through 38 GB helps nobody."""
    import shutil

    place = folder.absolute()
    while not place.exists() and place != place.parent:
        place = place.parent
    try:
        free = shutil.disk_usage(place).free
    except OSError:
        return None  # cannot tell: the download will say if it fails
    if free >= needed + DISK_MARGIN_BYTES:
        return None
    return (
        f"Not enough disk space: {format_size(needed)} to download into {folder}, and {format_size(free)} "
        f"free there ({format_size(DISK_MARGIN_BYTES)} are kept free). Free some space, or give another "
        "--models_dir on a larger disk."
    )


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    from flux.devices import HardwareError  # torch: after the flags, so that --help answers at once

    models_dir = Path(args.models_dir) if args.models_dir is not None else default_models_dir()
    try:
        entries = chosen_entries(args)
    except (WeightChoiceError, HardwareError) as err:
        print(f"Cannot plan the download: {err}", file=sys.stderr)
        return 2
    missing = []
    print(f"{'status':<9}{'size':>10}  {'what':<58} place")
    for entry in entries:
        weights = entry.weights
        try:
            found = find_local(weights, models_dir)
        except WeightsNotFoundError:
            found = None
        where = found if found is not None else weights.local_path(models_dir)
        if found is not None:
            status = "present"
        elif local_problem(weights, where):
            status = "broken"  # an empty or cut-off file, or a folder in its place: said below
        else:
            status = "optional" if weights.optional else "missing"
        what = textwrap.shorten(weights.description, 56, placeholder="...")
        print(f"{status:<9}{format_size(weights.size_bytes):>10}  {what:<58} {where}")
        if status == "broken":
            print(f"{'':<21}{local_problem(weights, where)}")
        if found is None:
            missing.append(entry)
    total = sum(entry.weights.size_bytes for entry in missing)
    print(f"{len(missing)} to download ({format_size(total)}) into {models_dir}")
    if missing and not models_dir.exists():
        print(f"{models_dir} does not exist yet: it is made when the download starts (a typo?).")
    if args.dry_run or not missing:
        return 0
    if (short := disk_shortfall(models_dir, total)) is not None:
        print(short, file=sys.stderr)
        return 1
    blocked = download_blocked()
    if blocked is not None:
        print(f"Cannot download: {blocked}.", file=sys.stderr)
        return 1
    failures = 0
    for entry in missing:
        try:
            path = download(entry.weights, models_dir)
        except WeightsNotFoundError as err:
            print(err, file=sys.stderr)
            failures += 1
            continue
        print(f"done: {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
