"""Soak the app: many generations through the HTTP API with random settings and attacks mixed in.

Starts the app on the tiny-random preset in a subprocess (127.0.0.1, a free port), sends
``--requests`` requests from ``--clients`` concurrent gradio clients, and counts outcomes by kind.
Besides good requests: bad photos and settings, jobs cancelled while they run (``Job.cancel()``),
and raw HTTP calls naming files on the server that were never uploaded. It checks that every
answer is an image or a clear message, that the server never dies, that its memory does not grow,
that no file is left outside its upload and output folders, and how long the slowest good request
took. Writes a JSON report and prints it.

    python scripts/soak.py --requests 200 --clients 3 --out soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

KINDS = {  # phrase of the message -> outcome kind
    "No face found": "no_face",
    "Could not read": "unreadable_image",
    "too small": "image_too_small",
    "must be a multiple of 16": "bad_size",
    "less than minimum": "out_of_range_setting",
    "greater than maximum": "out_of_range_setting",
    "Seed (-1 for random) must be": "bad_seed",
    "Number of steps must be": "bad_steps",
    "Number of steps: Value": "bad_steps",
    "ID weight must be": "bad_id_weight",
    "is too long": "text_too_long",
    "megapixels": "too_many_pixels",
    "was not uploaded to this app": "not_uploaded",
    "is not a regular file": "not_a_regular_file",
    "extra photos were sent": "too_many_photos",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def random_request(rng: random.Random, files: dict[str, Path], good: Path) -> tuple[str, dict]:
    """(what was sent, settings) with about one bad input in three."""
    settings = dict(
        prompt=rng.choice(["portrait", "a photo of a woman in snow", "", ("cinematic " * 200)[:2000]]),
        id_image=good,
        extra_images=[],
        id_weight=round(rng.uniform(0, 3), 2),
        width=rng.choice([256, 272, 320]),
        height=rng.choice([256, 288]),
        num_steps=rng.randint(1, 3),
        start_step=rng.randint(0, 2),
        guidance=round(rng.uniform(1, 6), 1),
        seed=str(rng.choice([-1, rng.randint(0, 2**32)])),
        max_sequence_length=rng.choice([128, 256]),
        neg_prompt="bad",
        true_cfg=rng.choice([1.0, 1.0, 2.5]),
        cfg_start_step=rng.randint(0, 2),
        num_images=rng.choice([1, 1, 1, 2]),
        output_format=rng.choice(["png", "png", "jpeg", "webp"]),
    )
    roll = rng.random()
    if roll < 0.2:
        name = rng.choice(sorted(files))
        settings["id_image"] = files[name]
        return f"file:{name}", settings
    if roll < 0.3:
        settings["extra_images"] = [files[rng.choice(sorted(files))]]
        return "extra_file", settings
    if roll < 0.4:
        key, value = rng.choice(
            [
                ("width", 1000),
                ("height", 250),
                ("seed", "abc"),
                ("num_steps", 0),
                ("id_weight", 3.5),
                ("seed", str(2**70)),
                ("seed", "1e400"),
                ("num_steps", 2.5),
                ("neg_prompt", "x" * 100_000),
            ]
        )
        settings[key] = value
        return f"bad:{key}", settings
    if roll < 0.45:
        settings["id_image"] = None
        return "no_id", settings
    if roll < 0.52:
        settings["num_steps"] = 3
        return "cancel", settings
    if roll < 0.56:
        settings["id_image"] = rng.choice(["/etc/passwd", str(good), "../../../etc/hostname"])
        return "raw_path", settings
    return "good", settings


def in_api_order(settings: dict) -> dict:
    """Every /generate parameter in the endpoint's order (raw HTTP sends a positional list)."""
    from pulid.request import generation_settings
    from pulid.serve.components import input_names

    defaults = {s.name: s.default for s in generation_settings()}
    return {name: settings.get(name, defaults.get(name)) for name in input_names()}


def files_under(folder: Path) -> list[str]:
    """Every file below ``folder`` (the server's TMPDIR), relative to it, apart from the inputs."""
    return [
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "inputs" not in p.parts[:2]
    ]


def classify(message: str) -> str:
    lowered = message.lower()
    return next((kind for phrase, kind in KINDS.items() if phrase.lower() in lowered), "other_error")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from gradio_client import Client, handle_file

    from tests.bad_inputs import write_bad_inputs

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    files = write_bad_inputs(work / "inputs")
    good = REPO / "example_inputs" / "astronaut.png"
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "TMPDIR": str(work)}
    server = subprocess.Popen(
        [sys.executable, "app_flux.py", "--preset", "tiny-random", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(300):
            try:
                clients = [Client(url, verbose=False) for _ in range(args.clients)]
                break
            except Exception:  # noqa: BLE001 - not up yet
                if server.poll() is not None:
                    raise RuntimeError("the app exited during start-up") from None
                time.sleep(1)
        else:
            raise RuntimeError("the app did not start")

        def send(client, settings):
            values = dict(settings)
            values["id_image"] = handle_file(str(values["id_image"])) if values["id_image"] else None
            values["extra_images"] = [handle_file(str(p)) for p in values["extra_images"]]
            return client.predict(**values, api_name="/generate")

        def send_and_cancel(client, settings, delay: float) -> str:
            values = dict(settings)
            values["id_image"] = handle_file(str(values["id_image"]))
            job = client.submit(**values, api_name="/generate")
            time.sleep(delay)
            job.cancel()
            return "cancelled"

        def send_raw_path(settings) -> str:
            """A file input naming a server path, the way a hand-written HTTP client can."""
            import httpx

            values = in_api_order(
                {**settings, "id_image": {"path": settings["id_image"], "meta": {"_type": "gradio.FileData"}}}
            )
            posted = httpx.post(
                f"{url}gradio_api/call/generate", json={"data": list(values.values())}, timeout=30
            )
            if posted.status_code == 422:  # refused at the door (pulid.serve.web_guard.PayloadCheck)
                return "refused_path" if "was not uploaded" in posted.text else "path_was_read"
            event_id = posted.json()["event_id"]
            with httpx.stream("GET", f"{url}gradio_api/call/generate/{event_id}", timeout=120) as stream:
                text = "\n".join(stream.iter_lines())
            return "refused_path" if "event: error" in text else "path_was_read"

        before = set(files_under(work))

        rng = random.Random(args.seed)
        jobs = [random_request(rng, files, good) for _ in range(args.requests)]
        send(clients[0], random_request(random.Random(1), files, good)[1] | {"id_image": good})  # warm-up
        rss_start = rss_mib(server.pid)
        outcomes: Counter = Counter()
        sent: Counter = Counter()
        rss_samples: list[tuple[int, float]] = [(0, round(rss_start, 1))]
        unexpected: set[str] = set()
        lock = threading.Lock()
        start = time.perf_counter()

        latencies: list[float] = []

        def worker(index: int) -> None:
            pacing = random.Random(args.seed + index)
            for what, settings in jobs[index :: args.clients]:
                began = time.perf_counter()
                try:
                    if what == "cancel":
                        kind = send_and_cancel(clients[index], settings, pacing.uniform(0.05, 0.6))
                    elif what == "raw_path":
                        kind = send_raw_path(settings)
                    else:
                        send(clients[index], settings)
                        kind = "image"
                        if what == "good":
                            with lock:
                                latencies.append(time.perf_counter() - began)
                except Exception as err:  # noqa: BLE001 - the message is what we count
                    kind = classify(str(err))
                    if kind == "other_error":
                        with lock:
                            unexpected.add(f"{what}: {str(err)[:300]}")
                with lock:
                    outcomes[kind] += 1
                    sent[what.split(":")[0]] += 1
                    done = sum(outcomes.values())
                    if done % max(1, args.requests // 10) == 0:
                        rss_samples.append((done, round(rss_mib(server.pid), 1)))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        alive = server.poll() is None
        rss_end = rss_mib(server.pid) if alive else float("nan")
        new_files = sorted(set(files_under(work)) - before)
        kept = ("gradio/", "pulid-flux-outputs-")  # the upload cache and the image folder
        left_behind = [name for name in new_files if not name.startswith(kept)]
    finally:
        server.terminate()
        server.wait(timeout=30)
    report = {
        "requests": args.requests,
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "sent": dict(sent),
        "outcomes": dict(outcomes),
        "crashes": 0 if alive else 1,
        "unexpected_messages": sorted(unexpected),
        "server_rss_mib_start": round(rss_start, 1),
        "server_rss_mib_end": round(rss_end, 1),
        "server_rss_mib_by_request": rss_samples,
        "new_files_in_upload_and_output_folders": len(new_files) - len(left_behind),
        "files_left_elsewhere": left_behind[:20],
        "good_request_seconds": {
            "count": len(latencies),
            "median": round(sorted(latencies)[len(latencies) // 2], 2) if latencies else None,
            "max": round(max(latencies), 2) if latencies else None,
        },
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
