"""A full line: how the app answers while one job runs and the line's 32 places are taken.

Starts the app on the tiny-random preset (127.0.0.1, a free port), starts one long job, puts
``--waiting`` more in line from as many sessions (raw HTTP, each listening to its own stream), then
times the API page's ``/gradio_api/info`` and a waiting visitor's Cancel, and counts the messages
the waiting jobs were sent. Everything stays on this machine and stops by itself. Writes a JSON
report and prints it.

    python scripts/full_line.py --out line.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.soak import free_port, in_api_order  # noqa: E402
from scripts.tiny_app import tiny_app  # noqa: E402


def listen(url: str, session: str, heard: list[str], stop: threading.Event) -> None:
    """Count the messages a session's stream is sent until ``stop``."""
    route = f"{url}gradio_api/queue/data?session_hash={session}"
    with (
        contextlib.suppress(httpx.HTTPError, httpx.StreamError),
        httpx.stream("GET", route, timeout=None) as stream,
    ):
        for line in stream.iter_lines():
            if stop.is_set():
                return
            if line.startswith("data:"):
                heard.append(json.loads(line[5:])["msg"])


def request_values(**settings) -> list:
    """Every /generate input in order: no photo, no LoRA, nobody else, small unless told."""
    from pulid.serve.components import lora_input_names, people_input_names

    values = {"prompt": "a portrait", "seed": "1", **settings}
    for name in lora_input_names():
        values[name] = 1.0 if name.endswith("_strength") else ""
    for name in people_input_names():
        values[name] = 1.0 if name.endswith("_weight") else None if name.endswith("_region") else []
    values["extra_images"] = []
    return list(in_api_order(values).values())


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--waiting", type=int, default=32, help="jobs waiting behind the running one")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the messages are counted")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="full-line-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    stop = threading.Event()
    with tiny_app(port, {"TMPDIR": str(work)}) as server:
        config = httpx.get(f"{url}config", timeout=30).json()
        index = {d.get("api_name"): d["id"] for d in config["dependencies"]}
        quiet_info = [timed(lambda: httpx.get(f"{url}gradio_api/info", timeout=120)) for _ in range(3)]

        def join(session: str, **settings) -> list[str]:
            body = {
                "data": request_values(**settings),
                "fn_index": index["generate"],
                "session_hash": session,
            }
            httpx.post(f"{url}gradio_api/queue/join", json=body, timeout=60).raise_for_status()
            heard: list[str] = []
            threading.Thread(target=listen, args=(url, session, heard, stop), daemon=True).start()
            return heard

        join("running", width=1024, height=1024, num_steps=50, num_images=4)
        time.sleep(3)  # it has started
        streams = [join(f"waiting-{i}", width=256, height=256, num_steps=2) for i in range(args.waiting)]
        time.sleep(args.seconds)
        sent = sum(heard.count("process_generating") for heard in streams)
        waited = sum("process_completed" not in heard for heard in streams)  # still in line at the count
        busy_info = [timed(lambda: httpx.get(f"{url}gradio_api/info", timeout=120)) for _ in range(3)]
        cancel = timed(
            lambda: httpx.post(
                f"{url}gradio_api/run/cancel",
                json={"data": [], "fn_index": index["cancel"], "session_hash": "waiting-0"},
                timeout=120,
            )
        )
        report = {
            "waiting": args.waiting,
            "still_waiting_when_counted": waited,
            "first_waiting_stream": streams[0][:12],
            "counted_s": args.seconds,
            "status_messages_per_waiting_job_per_s": round(sent / args.waiting / args.seconds, 3),
            "info_s_idle": [round(s, 3) for s in quiet_info],
            "info_s_full_line": [round(s, 3) for s in busy_info],
            "cancel_s_full_line": round(cancel, 3),
            "server_alive": server.poll() is None,
        }
        stop.set()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
