"""The benchmarks' shared harness (``benchmarks/harness.py``), checked on the CPU: the subprocess
driver, the tables and reports, the step timer, the benchmark request, the ID encoder's public
``forget``, and that every benchmark script still answers ``--help``."""

import argparse
import json
import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.harness import (
    ALLOC_CONF,
    DEFAULT_ALLOC_CONF,
    Column,
    StepTimer,
    bench_request,
    child_args,
    markdown_table,
    meta,
    print_result,
    run_child,
    run_modes,
    write_report,
)

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(path for path in (REPO / "benchmarks").glob("*.py") if path.name != "harness.py")

# A child as the benchmarks have them: answers one RESULT line, except the mode "broken".
CHILD = """
import json, os, sys

mode = sys.argv[sys.argv.index("--child") + 1]
if mode == "broken":
    print("half of the work")
    print("it broke here", file=sys.stderr)
    sys.exit(3)
if mode == "silent":
    print("no result line")
    sys.exit(0)
print("progress line")
row = {"mode": mode, "rest": sys.argv[3:], "alloc": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
print("RESULT " + json.dumps(row))
"""


@pytest.fixture
def child(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return script


def test_each_mode_runs_in_its_own_child_and_a_failed_one_is_reported(child, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(ALLOC_CONF, raising=False)
    logs = tmp_path / "logs"
    seen = []
    rows = run_modes(child, ["first", "broken", "last"], ["--steps", "2"], logs, on_row=seen.append)
    assert [row["mode"] for row in rows] == ["first", "last"]
    assert seen == rows
    assert rows[0]["rest"] == ["--steps", "2"]
    assert rows[0]["alloc"] == DEFAULT_ALLOC_CONF  # the app's allocator setting when none is set
    printed = capsys.readouterr().out
    assert "mode broken failed (rc 3)" in printed and "it broke here" in printed
    assert sorted(path.name for path in logs.iterdir()) == ["broken.log", "first.log", "last.log"]
    broken = (logs / "broken.log").read_text()
    assert "half of the work" in broken and "it broke here" in broken
    assert "progress line" in (logs / "first.log").read_text()


def test_an_allocator_setting_already_set_is_kept_and_overrides_win(child, tmp_path, monkeypatch):
    monkeypatch.setenv(ALLOC_CONF, "backend:cudaMallocAsync")
    kept = run_child(child, "a", [], tmp_path / "a.log")
    assert kept.row["alloc"] == "backend:cudaMallocAsync" and not kept.failed
    forced = run_child(child, "b", [], tmp_path / "b.log", env={ALLOC_CONF: "expandable_segments:False"})
    assert forced.row["alloc"] == "expandable_segments:False"


def test_a_child_that_ends_well_without_a_result_has_failed(child, tmp_path):
    run = run_child(child, "silent", [], tmp_path / "silent.log")
    assert run.returncode == 0 and run.row is None and run.failed
    assert "no result line" in (tmp_path / "silent.log").read_text()


def test_the_result_line_is_what_the_driver_reads(capsys):
    print_result({"mode": "resident", "folder": Path("/tmp/x"), "ms": 1.5})
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("RESULT ")
    assert json.loads(line[len("RESULT ") :]) == {"mode": "resident", "folder": "/tmp/x", "ms": 1.5}


def test_a_parsed_command_line_is_passed_on_to_a_child():
    args = argparse.Namespace(width=896, out=Path("/o"), compile=True, quiet=False, files=None)
    assert child_args(args, "width", "out", "compile", "quiet", "files") == [
        "--width",
        "896",
        "--out",
        "/o",
        "--compile",
    ]


COLUMNS = (
    Column("mode", "mode"),
    Column("step (ms)", "step_ms", "{:.1f}"),
    Column("peak / reserved", lambda r: (r["peak"], r["reserved"]), lambda v: f"{v[0]:.1f} / {v[1]:.1f}"),
)


def test_a_table_writes_formats_and_dashes_for_missing_values():
    rows = [
        {"mode": "resident", "step_ms": 123.456, "peak": 20.04, "reserved": 21.96},
        {"mode": "offload", "step_ms": None, "peak": 3.0},  # no step, no reserved
    ]
    lines = markdown_table(rows, COLUMNS).splitlines()
    assert lines[0] == "| mode | step (ms) | peak / reserved |"
    assert lines[1] == "|---|---|---|"
    assert lines[2] == "| resident | 123.5 | 20.0 / 22.0 |"
    assert lines[3] == "| offload | - | - |"
    assert all(line.count("|") == len(COLUMNS) + 1 for line in lines)
    assert len(lines) == 2 + len(rows)


def test_a_report_is_json_and_markdown_read_back(tmp_path):
    rows = [{"mode": "resident", "step_ms": 100.0, "peak": 1.0, "reserved": 2.0}]
    info = {"command": "bench", "steps": 3}
    out = tmp_path / "new" / "folder"
    table = write_report(out, "bench", rows, info, COLUMNS, build={"built": ["a", "b"]})
    assert json.loads((out / "bench.json").read_text()) == {
        "meta": info,
        "rows": rows,
        "build": {"built": ["a", "b"]},
    }
    assert (out / "bench.md").read_text() == table + "\n"
    assert table == markdown_table(rows, COLUMNS)


def test_a_report_records_the_command_date_device_and_torch():
    info = meta("NVIDIA H100", steps=10)
    assert info["device"] == "NVIDIA H100" and info["steps"] == 10
    assert info["torch"] == torch.__version__ and info["command"] == " ".join(sys.argv)
    assert len(info["date"]) == len("2026-12-06")
    assert isinstance(meta()["device"], str)


def test_the_step_timer_gives_the_times_between_its_marks():
    timer = StepTimer("cpu")
    assert timer.intervals_ms() == [] and math.isnan(timer.median_ms)
    for step in range(6):
        timer({"step": step})  # as generate calls its callback
        sum(range(2000))
    steps = timer.intervals_ms()
    assert len(steps) == 5 and all(ms >= 0 for ms in steps)
    assert min(steps) == timer.min_ms <= timer.median_ms <= max(steps)
    timer.reset()
    assert timer.intervals_ms() == []


def test_the_benchmark_request_and_its_overrides():
    default = bench_request()
    assert (default.width, default.height, default.num_steps, default.seed) == (896, 1152, 28, 42)
    assert default.max_sequence_length == 128 and default.prompt == "portrait, color, cinematic"
    (photo,) = default.id_images
    assert photo.shape == (512, 512, 3) and photo.dtype == np.uint8  # the astronaut
    changed = bench_request(prompt="a portrait, cinematic", width=1024, num_steps=2, id_images=[], seed=7)
    assert (changed.prompt, changed.width, changed.num_steps, changed.seed) == (
        "a portrait, cinematic",
        1024,
        2,
        7,
    )
    assert changed.id_images == [] and changed.height == 1152 and changed.max_sequence_length == 128
    assert bench_request(num_images=2).num_images == 2  # any other field of the request


def test_forget_drops_the_cached_photos_and_keeps_the_tokens(pipeline):
    encoder = pipeline.id_encoder
    photo = np.random.default_rng(2024).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    first = encoder([photo]).tokens
    calls = encoder.face_analyzer.calls
    encoder([photo])
    assert encoder.face_analyzer.calls == calls  # seen: from the cache
    encoder.forget()
    again = encoder([photo]).tokens
    assert encoder.face_analyzer.calls == calls + 1  # analysed afresh
    assert torch.equal(first, again)


def test_no_benchmark_reaches_into_a_private_cache():
    offenders = [path.name for path in SCRIPTS if "._cache" in path.read_text()]
    assert offenders == []


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_every_benchmark_answers_help_on_the_cpu(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # each script puts the repository first
    with pytest.raises(SystemExit) as ended:
        runpy.run_path(str(script), run_name="__main__")
    assert ended.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")
