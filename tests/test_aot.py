"""Blocks compiled ahead of time (``flux.aot``): built once, loaded by a fresh process.

A small DiT with two blocks of each kind: every block of a kind runs through one package with its
own weights as inputs, so a package that had kept the first block's weights would be caught. The
fresh process compiles nothing, and a size that was not built runs uncompiled, still right.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flux.aot import AheadOfTime, compile_ahead
from flux.repeated import block_modules
from tests.tiny_models import dit_inputs, small_dit

ROOT = Path(__file__).resolve().parent.parent
F32_TOLERANCE = 1e-5  # float32 against float64, relative to the largest value


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


LOAD = """
import json, sys, torch
from flux.aot import AheadOfTime, compile_ahead
from flux.repeated import block_modules
from tests.tiny_models import small_dit, dit_inputs
dit = small_dit()
backend = AheadOfTime(sys.argv[1], "load")
compile_ahead(block_modules(dit), backend)
with torch.inference_mode():
    built_size = dit(**dit_inputs(dit))
    other_size = dit(**dit_inputs(dit, tokens=(4, 8)))
torch.save({"built": built_size, "other": other_size}, sys.argv[2])
print(json.dumps({"built": backend.built, "loaded": backend.loaded, "missing": backend.missing}))
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The small DiT's blocks built ahead of time once for the module: (folder, keys built, the
    DiT's output with them, its float64 output)."""
    folder = tmp_path_factory.mktemp("packages")
    dit = small_dit()
    inputs = dit_inputs(dit)
    with torch.inference_mode():
        expected = small_dit().double()(**{k: v.double() for k, v in inputs.items()})
        backend = AheadOfTime(folder, "build")
        assert compile_ahead(block_modules(dit), backend) == 4
        output = dit(**inputs)
    return folder, list(backend.built), output, expected


@pytest.mark.slow  # an ahead-of-time build, then a new Python that loads it
def test_packages_built_once_run_every_block_with_its_own_weights_in_a_fresh_process(built, tmp_path):
    folder, keys, output, expected = built
    assert len(keys) == 2  # one graph per kind of block, shared by both blocks of the kind
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{key}.pt2" for key in keys)  # no partial file
    assert relative_error(output, expected) < F32_TOLERANCE

    done = subprocess.run(
        [sys.executable, "-c", LOAD, str(folder), str(tmp_path / "out.pt")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["built"] == [] and sorted(report["loaded"]) == sorted(keys)
    assert len(report["missing"]) == 2  # the other size's two graphs: run as traced
    outputs = torch.load(tmp_path / "out.pt", weights_only=True)
    assert relative_error(outputs["built"], expected) < F32_TOLERANCE
    with torch.inference_mode():
        dit = small_dit()
        other = small_dit().double()(**{k: v.double() for k, v in dit_inputs(dit, tokens=(4, 8)).items()})
    assert relative_error(outputs["other"], other) < F32_TOLERANCE


def test_a_graph_key_names_its_code_and_its_inputs():
    from flux.aot import graph_key

    class Twice(torch.nn.Module):
        def forward(self, x):
            return 2 * x

    graph = torch.fx.symbolic_trace(Twice())
    key = graph_key(graph, [torch.zeros(2, 3)])
    assert key == graph_key(graph, [torch.ones(2, 3)])  # values do not matter
    assert key != graph_key(graph, [torch.zeros(3, 2)])  # shapes do
    assert key != graph_key(graph, [torch.zeros(2, 3, dtype=torch.float64)])  # dtypes do
    assert key != graph_key(torch.fx.symbolic_trace(torch.nn.Identity()), [torch.zeros(2, 3)])
    import flux.aot

    real_version = torch.__version__
    try:  # a package built by another torch (an upgraded Space) has another name
        flux.aot.torch.__version__ = "0.0.0"
        assert key != graph_key(graph, [torch.zeros(2, 3)])
    finally:
        flux.aot.torch.__version__ = real_version


@pytest.mark.slow  # loads the module's ahead-of-time build
def test_a_damaged_package_runs_uncompiled(built, tmp_path):
    folder, keys, _, _ = built
    for key in keys:  # cut off, as by a slice's time limit before the rename existed
        (tmp_path / f"{key}.pt2").write_bytes(b"PK\x03\x04 half a zip")
    fresh = small_dit()
    inputs = dit_inputs(fresh)
    with torch.inference_mode():
        expected = small_dit()(**inputs)
    loading = AheadOfTime(tmp_path, "load")
    compile_ahead(block_modules(fresh), loading)
    with torch.inference_mode():
        result = fresh(**inputs)
    assert sorted(loading.missing) == sorted(keys) and loading.loaded == []
    assert relative_error(result, expected) < F32_TOLERANCE


def test_without_packages_every_block_runs_as_traced_and_right(tmp_path):
    """The fast tier's sibling of the two above: loading from an empty folder builds nothing,
    finds every graph missing and runs them as traced, with the eager model's output."""
    dit = small_dit()
    inputs = dit_inputs(dit)
    with torch.inference_mode():
        expected = small_dit()(**inputs)
    loading = AheadOfTime(tmp_path, "load")
    compile_ahead(block_modules(dit), loading)
    with torch.inference_mode():
        result = dit(**inputs)
    assert len(loading.missing) == 2 and loading.loaded == [] and loading.built == []
    assert list(tmp_path.iterdir()) == []
    assert relative_error(result, expected) < F32_TOLERANCE
