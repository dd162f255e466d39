"""What a new user waits for on the tiny preset: the app's start, and an image at the page's settings.

Starts ``app_flux.py --preset tiny-random`` (127.0.0.1, a free port) as README's command does,
times how long until it serves its page, then times three images at the settings the page starts
with (the astronaut photo, 256x256, 4 steps) through gradio_client. Writes a JSON report and
prints it.

    python scripts/first_contact.py --out first-contact.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.soak import free_port  # noqa: E402
from scripts.tiny_app import tiny_app  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from gradio_client import Client, handle_file

    from pulid.serve.page import TINY_START

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    started = time.perf_counter()
    with tiny_app(port):
        served_s = time.perf_counter() - started
        client = Client(url, verbose=False)
        photo = handle_file(str(REPO / "example_inputs" / "astronaut.png"))
        seconds = []
        for seed in range(args.images):
            start = time.perf_counter()
            client.predict(prompt="portrait, color, cinematic", id_image=photo, seed=str(seed), **TINY_START,
                           api_name="/generate")  # fmt: skip
            seconds.append(round(time.perf_counter() - start, 2))
    report = {"page_served_s": round(served_s, 1), "image_s_at_page_start": seconds, "settings": TINY_START}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
