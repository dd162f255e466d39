"""Shared pytest setup.

The environment variables are set at import time, before any test module imports gradio,
huggingface_hub or transformers: the tests must never reach a model hub or analytics server.
"""

import os

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
}.items():
    os.environ.setdefault(_key, _value)

# In an xdist worker, each worker's math libraries get their share of the cores. Left alone, each
# of two workers on two cores ran two OpenMP threads that spun waiting for each other: the fast
# tier took 350 s, and 247 s with one thread per worker (measured 2026-12-08). Set before torch is
# imported; the processes the tests start inherit it.
if _workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(_workers))))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """Stand-in antelopev2 and facexlib files (real formats, built once per test session)."""
    from tiny_random.pipeline import build_tiny_face_models

    return build_tiny_face_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def outside_folder():
    """A folder outside both the working directory and the temp folder, as a Space's ``/data``
    is: gradio copies files from those two only, so the app's outputs are kept here in tests."""
    import shutil
    import tempfile
    from pathlib import Path

    cwd, temp = Path.cwd().resolve(), Path(tempfile.gettempdir()).resolve()
    for base in (Path("/var/tmp"), Path.home()):
        base = base.resolve()
        if base.is_dir() and os.access(base, os.W_OK) and not {cwd, temp} & {base, *base.parents}:
            break
    else:
        pytest.fail("no writable folder outside the working directory and the temp folder")
    folder = Path(tempfile.mkdtemp(prefix="pulid-flux-tests-", dir=base))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def app_pipeline(tmp_path_factory, models_dir):
    """The app's tiny pipeline, with two example LoRAs and a speed LoRA in its LoRA folder, a LoRA
    linked from a store outside it and a listed file that is not a LoRA."""
    import shutil

    from tiny_random.loras import random_factors, write_example_loras, write_kohya
    from tiny_random.pipeline import tiny_face_analyzer, tiny_pipeline

    pipeline = tiny_pipeline(tmp_path_factory.mktemp("tiny"), tiny_face_analyzer(models_dir))
    write_example_loras(pipeline.lora_library.folder, pipeline.dit)  # tiny-style, tiny-detail
    # a stand-in for one speed LoRA, on this machine as after `pulid.serve.download --speed_lora`: offered
    speed = pipeline.lora_library.folder / "FLUX.1-Turbo-Alpha.safetensors"
    write_kohya(speed, random_factors(pipeline.dit, rank=2, seed=13))
    # a shared LoRA store linked file by file, and a listed file that is not a LoRA
    store = tmp_path_factory.mktemp("lora-store") / "style.safetensors"
    shutil.copy(pipeline.lora_library.folder / "tiny-style.safetensors", store)
    (pipeline.lora_library.folder / "linked-style.safetensors").symlink_to(store)
    (pipeline.lora_library.folder / "broken.safetensors").write_bytes(b'\x08\0\0\0\0\0\0\0{"a": 1}')
    return pipeline


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """The tiny pipeline with a stand-in face analyser, one for the whole run: generating never
    changes a pipeline (a module that needs another kind defines its own ``pipeline``)."""
    from tests.stubs import StubFaceAnalyzer
    from tiny_random.pipeline import tiny_pipeline

    return tiny_pipeline(tmp_path_factory.mktemp("tiny"), StubFaceAnalyzer())


@pytest.fixture(scope="session")
def uploading_service(pipeline, tmp_path_factory):
    """A service on the shared tiny pipeline that reads uploads from one folder: (service, folder)."""
    from pulid.serve.service import GenerationService

    uploads = tmp_path_factory.mktemp("uploads")
    return GenerationService(pipeline, tmp_path_factory.mktemp("out"), upload_roots=[uploads]), uploads


@pytest.fixture(scope="session")
def server(app_pipeline, outside_folder):
    """The app on the tiny preset, served once for the whole run, with its outputs outside the
    working and temp folders (as a Space's /data)."""
    import tempfile
    from pathlib import Path

    from pulid.serve import gradio_app, page
    from scripts.soak import free_port

    args = gradio_app.parse_args(["--preset", "tiny-random", "--dev"])
    outputs = Path(tempfile.mkdtemp(prefix="outputs-", dir=outside_folder))
    demo = page.create_demo(args, gradio_app.make_service(app_pipeline, outputs))
    port = free_port()
    gradio_app.launch(demo, args, server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="session")
def client(server):
    """A gradio client of the shared app."""
    from gradio_client import Client

    return Client(server, verbose=False)


@pytest.fixture
def cli_in_process(capsys):
    """``generate.py ARGV`` run in this process: a ``CompletedProcess`` with the exit code and the
    output, as a new process would give them (an exit message on stderr, status 1)."""
    import subprocess

    from pulid.serve import cli

    def run(argv: list[str]) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            code = cli.main(argv)
        except SystemExit as stop:  # the parser's refusals, a start that cannot go on
            code = stop.code
        out, err = capsys.readouterr()
        if isinstance(code, str):
            code, err = 1, f"{err}{code}\n"
        return subprocess.CompletedProcess(["generate.py", *argv], code, out, err)

    return run


@pytest.fixture
def run_cli(app_pipeline, monkeypatch, cli_in_process):
    """``generate.py --preset tiny-random FLAGS`` run in this process on the shared tiny pipeline
    (the preset's models, loaded once). One test starts the real ``generate.py`` (test_app.py);
    the others need no new process."""
    from pulid.serve import cli

    monkeypatch.setattr(cli, "load_or_exit", lambda args: app_pipeline)
    return lambda *flags: cli_in_process(["--preset", "tiny-random", *flags])
