"""A hostile visitor at every front door: raw HTTP to the gradio routes, the Python API, the CLI.

Each test sends what an attacker of a public Space would and checks that the answer is a message
naming the problem, that nothing outside the uploads is read, and that the server goes on.
"""

import os
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pulid.request import GenerationRequest, InvalidRequestError, generation_settings
from tests.app_requests import PHOTO, call

REPO = Path(__file__).resolve().parent.parent
FILE = {"meta": {"_type": "gradio.FileData"}}


def raw_generate(url: str, **overrides) -> tuple[str, str]:
    """POST /gradio_api/call/generate with JSON as any HTTP client may send it: (event, data)."""
    from tests.app_requests import settings as defaults

    values = {**defaults(), **overrides}
    posted = httpx.post(f"{url}gradio_api/call/generate", json={"data": list(values.values())}, timeout=30)
    posted.raise_for_status()
    event_id = posted.json()["event_id"]
    with httpx.stream("GET", f"{url}gradio_api/call/generate/{event_id}", timeout=120) as stream:
        event = ""
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                return event, line.split(":", 1)[1].strip()
    raise AssertionError("no answer")


@pytest.mark.parametrize("field", ["id_image", "extra_images"])
@pytest.mark.parametrize(
    "path",
    [str(PHOTO), "/etc/passwd", "../../../../etc/passwd", "https://example.com/face.jpg"],
    ids=["server-photo", "system-file", "relative", "url"],
)
def test_a_file_input_that_was_not_uploaded_is_refused(server, field, path):
    """Refused at the door with the input named (gradio's own preprocessing would refuse it later
    with an empty message; the app's check, which the next test drives, stands behind both).
    Nothing is read: the server photo holds a face, so reading it would have given an image."""
    from tests.app_requests import settings as defaults

    value = {**FILE, "path": path}
    values = {**defaults(), field: value if field == "id_image" else [value]}
    posted = httpx.post(f"{server}gradio_api/call/generate", json={"data": list(values.values())}, timeout=30)
    assert posted.status_code == 422, posted.text
    (detail,) = posted.json()["detail"]
    said = "is a link" if "://" in path else "was not uploaded to this app"
    assert detail["parameter_name"] == field and detail["message"].startswith(f"{path!r} {said}: upload")
    assert str(REPO) not in posted.text or str(REPO) in path  # only what was sent is named
    assert int(call_ok(server)) == 5  # and the server serves the next request


def test_a_payload_gradio_cannot_run_is_refused_with_what_is_wrong(server):
    """Too few values, or a server path through the queue route gradio_client uses: 422 naming
    the problem, where gradio's queue answered an empty error and logged the reason."""
    from gradio_client.utils import extract_validation_message

    from tests.app_requests import settings as defaults

    values = list(defaults().values())
    short = httpx.post(f"{server}gradio_api/call/generate", json={"data": values[:-5]}, timeout=30)
    assert short.status_code == 422
    message = short.json()["detail"][0]["message"]
    assert (
        message.startswith(f"{len(values)} values are expected (")
        and f"{len(values) - 5} were sent" in message
    )
    config = httpx.get(f"{server}config", timeout=30).json()
    fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "generate")
    names = list(defaults())
    values[names.index("id_image")] = {**FILE, "path": "/etc/passwd"}
    joined = httpx.post(
        f"{server}gradio_api/queue/join",
        json={"data": values, "fn_index": fn_index, "session_hash": "attacker"},
        timeout=30,
    )
    assert joined.status_code == 422
    # what gradio_client makes of it: a ValidationError with the input named
    assert extract_validation_message(joined) == (
        "1 parameter(s) failed validation:\n- id_image: '/etc/passwd' was not uploaded to this app: "
        "upload the file itself first."
    )


def test_the_door_check_cannot_be_stepped_around(server):
    """The shapes gradio also reads an event as (``fn_index`` "1" or true, ``/call/v2`` by name),
    a folder in the upload folder (gradio would hand it to its cache cleaner, which then stops
    for good), a link (gradio would download it), a NUL, JSON nested past parsing: each gets 422
    naming what is wrong, and nothing reaches gradio's queue."""
    import json

    from gradio.utils import get_upload_folder

    from tests.app_requests import settings as defaults

    names, values = list(defaults()), list(defaults().values())
    config = httpx.get(f"{server}config", timeout=30).json()
    fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "generate")
    uploads = Path(get_upload_folder())
    uploads.mkdir(parents=True, exist_ok=True)

    def refused(path, body, content=None) -> str:
        answer = httpx.post(f"{server}gradio_api/{path}", json=body, content=content, timeout=30)
        assert answer.status_code == 422, (path, answer.text)
        return answer.json()["detail"][0]["message"]

    def with_photo(photo) -> list:
        sent = list(values)
        sent[names.index("id_image")] = {**FILE, "path": photo}
        return sent

    for route in (str(fn_index), f" {fn_index}", True if fn_index == 1 else float(fn_index)):
        body = {"data": with_photo("/etc/passwd"), "fn_index": route, "session_hash": "s"}
        assert "was not uploaded" in refused("queue/join", body)
    by_name = dict(zip(names, with_photo("/etc/passwd"), strict=True))
    assert "was not uploaded" in refused("call/v2/generate", by_name)
    for photo, said in (
        (str(uploads), "was not uploaded"),  # the folder itself, and any folder in it
        ("http://192.0.2.1/face.png", "is a link"),
        (f"{uploads}/a\x00b.png", "must name an uploaded file"),
        (123, "must name an uploaded file"),
    ):
        assert said in refused("call/generate", {"data": with_photo(photo)})
    nested = '{"data": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert "nested too deeply" in refused("call/generate", None, content=nested.encode())
    many = json.dumps({"data": [[{**FILE, "path": "x"}] * 100]})
    assert "more than" in refused("call/generate", None, content=many.encode())
    assert int(call_ok(server)) == 5  # and the server serves the next request


def test_the_services_own_guard_reads_only_from_the_upload_folder(tmp_path):
    from pulid.serve.service import GenerationService, ServiceError
    from pulid.serve.uploads import UploadError, check_upload

    uploads = tmp_path / "uploads"
    uploads.mkdir()
    (uploads / "face.png").write_bytes(PHOTO.read_bytes())
    (uploads / "link.png").symlink_to(PHOTO)  # a link out of the folder counts as outside
    assert check_upload(uploads / "face.png", [uploads]) == (uploads / "face.png").resolve()
    for path in (PHOTO, uploads / "link.png", uploads / ".." / PHOTO.name, "/etc/passwd"):
        with pytest.raises(UploadError, match="was not uploaded to this app"):
            check_upload(path, [uploads])
    service = GenerationService(pipeline=None, output_dir=tmp_path / "out", upload_roots=[uploads])
    import os

    from pulid.images import ImageFile
    from pulid.request import GenerationRequest, Person

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)  # opening it would block the worker: the origin is checked before any open
    for sent in (
        GenerationRequest(prompt="a", id_images=[ImageFile(PHOTO)]),
        GenerationRequest(prompt="a", id_images=[ImageFile(uploads / "face.png")], mask=ImageFile(fifo)),
        GenerationRequest(prompt="a", more_people=(Person((ImageFile("/etc/passwd"),)),)),
    ):
        with pytest.raises(ServiceError, match="was not uploaded to this app"):
            service.run(sent)
    (uploads / "face.png").unlink()  # the app deletes uploads after an hour; the page may be older
    with pytest.raises(UploadError, match="face.png is no longer on the server: upload it again"):
        check_upload(uploads / "face.png", [uploads])


def call_ok(url):
    from gradio_client import Client

    return call(Client(url, verbose=False)).seed


@pytest.mark.parametrize("field", ["id_image", "extra_images"])
def test_a_special_file_in_the_upload_folder_is_refused_without_blocking(server, field, tmp_path):
    from gradio.utils import get_upload_folder

    fifo = Path(get_upload_folder()) / f"hostile-{os.getpid()}-{field}"
    fifo.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(fifo)
    try:
        from tests.app_requests import settings as defaults

        start = time.perf_counter()
        value = {**FILE, "path": str(fifo)}
        values = {**defaults(), field: value if field == "id_image" else [value]}
        posted = httpx.post(
            f"{server}gradio_api/call/generate", json={"data": list(values.values())}, timeout=30
        )
        assert posted.status_code == 422 and "is not a regular file" in posted.text, posted.text
        assert time.perf_counter() - start < 30  # opening a FIFO would wait forever
    finally:
        fifo.unlink()


def test_too_many_extra_photos_are_refused(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="5 extra photos were sent; at most 4"):
        call(client, id_image=PHOTO, extra_images=[PHOTO] * 5)
    with pytest.raises(AppError, match="7 photos were sent for one person; at most 5"):
        call(client, id_image=PHOTO, extra_images=[PHOTO] * 7)  # counted before any is checked


def test_a_refused_request_is_one_log_line_not_a_traceback(client, capfd, caplog):
    """An ordinary user mistake is not a crash: the operator's console gets one line."""
    import logging

    from gradio_client.exceptions import AppError

    with (
        caplog.at_level(logging.INFO, logger="pulid.serve"),
        pytest.raises(AppError, match="extra photos were sent"),
    ):
        call(client, id_image=PHOTO, extra_images=[PHOTO] * 5)
    assert any("refused a request: 5 extra photos" in r.getMessage() for r in caplog.records)
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("output_format", "A" * 900_000, "Output format must be one of png, jpeg, webp (got 'AAAA"),
        ("output_format", 123, "Output format must be text (got int)"),
        ("layout", ["masks"], "must be text (got list)"),
        ("lora_1", "B" * 900_000, "LoRA 1 must be one of the listed choices (got 'BBBB"),
    ],
)
def test_a_choice_that_is_not_listed_is_refused_by_name_and_cut_short(client, capfd, field, value, message):
    """Gradio's own check echoes the whole value to the client and logs a traceback with it."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as refused:
        call(client, id_image=PHOTO, **{field: value})
    assert message in str(refused.value) and len(str(refused.value)) < 300
    logged = capfd.readouterr()
    assert "Traceback" not in logged.err and len(logged.out) + len(logged.err) < 10_000


# -- one validation gate: random values of every type -----------------------------------------

ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=60),
    st.sampled_from(["1e400", "-inf", "nan", "0x10", "2.5", " 7 ", "", "１２"]),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.binary(max_size=8),
)
NAMES = [s.name for s in generation_settings()]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(NAMES), ANY_VALUE, min_size=1, max_size=len(NAMES)))
def test_any_value_of_any_type_becomes_a_request_or_a_typed_error(values):
    values.setdefault("prompt", "a portrait")
    try:
        request = GenerationRequest.from_values(**values)
    except InvalidRequestError as err:
        assert str(err)  # a message, and only this exception type
        return
    checked = request.checked()  # what the pipeline runs on: every value of its declared type
    for declared in generation_settings():
        value = getattr(checked, declared.name)
        assert type(value) is declared.kind, (declared.name, value)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=5)), min_size=1, max_size=3))
def test_photos_that_are_not_images_are_a_typed_error(photos):
    with pytest.raises(InvalidRequestError, match="ID photos must be a list of images"):
        GenerationRequest(prompt="a", id_images=photos).checked()


# -- the command line: every user error is one line and a non-zero status ---------------------


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--id_image", "missing.png"], "does not exist"),
        (["--id_image", "."], "is not a regular file"),
        (["--id_image", "README.md"], "Could not read the image README.md"),
        (["--out", "README.md"], "--out README.md is a file"),
        (["--prompts_file", "nothere.txt"], "cannot read --prompts_file"),
        (["--lora", "nothere.safetensors", "--width", "256", "--height", "256"], "was not found"),
        (["--models_dir", "README.md"], "README.md is a file: give the folder"),
    ],
)
def test_cli_user_errors_are_one_line_messages(flags, message, run_cli, monkeypatch):
    monkeypatch.chdir(REPO)
    proc = run_cli("--prompt", "x", *flags)  # an exception would fail the test: none escapes main
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr


def test_replies_name_only_gradios_own_cache(server):
    """Gradio serves results by path, so a reply carries one; it is always a copy in gradio's
    cache, never the outputs folder, the models folder or the repository."""
    import json

    from gradio.utils import get_upload_folder

    event, data = raw_generate(server)
    assert event == "complete", data

    def paths_in(value):
        if isinstance(value, dict):
            found = [value["path"]] if isinstance(value.get("path"), str) else []
            return found + [p for v in value.values() for p in paths_in(v)]
        if isinstance(value, list):
            return [p for v in value for p in paths_in(v)]
        return []

    paths = paths_in(json.loads(data))
    assert len(paths) >= 2  # the gallery's image and the file
    cache = Path(get_upload_folder()).resolve()
    assert all(cache in Path(path).resolve().parents for path in paths), paths
    assert str(REPO) not in data


def test_the_drawing_piece_route_is_not_offered(server, caplog):
    """gradio's ``accept_blobs`` kept pieces of drawings in memory for anyone who posted them (the
    page sends its layers as uploads): the route answers 404 for both canvases, without a
    traceback, and a request naming a drawing by id alone is refused with what to send instead."""
    config = httpx.get(f"{server}config", timeout=30).json()
    canvases = [c for c in config["components"] if c.get("type") == "imageeditor"]
    assert len(canvases) == 2 and not any("accept_blobs" in c.get("server_fns", []) for c in canvases)
    for canvas in canvases:
        for session, status in (({}, 400), ({"session_hash": "attacker"}, 404)):
            body = {"component_id": canvas["id"], "fn_name": "accept_blobs", "data": {"id": "x"}, **session}
            answer = httpx.post(f"{server}gradio_api/component_server/", json=body, timeout=30)
            assert answer.status_code == status and answer.json()["detail"], answer.text
    assert "Traceback" not in caplog.text
    by_id = {"background": None, "layers": [], "composite": None, "id": "drawn-ahead"}
    event, data = raw_generate(server, mask_drawing=by_id, init_image=None)
    assert event == "error" and "came without its layers" in data, data
    assert int(call_ok(server)) == 5


def test_lora_refusals_name_no_server_folder_and_linked_loras_load(app_pipeline, client):
    """A LoRA folder linked file by file (a shared store) was listed and then "not found"; a broken
    listed LoRA's refusal named the server's folders. Both through the page's API."""
    from gradio_client.exceptions import AppError

    from pulid.outputs import read_image_metadata

    meta = read_image_metadata(call(client, seed="4", lora_1="linked-style.safetensors").image)
    assert [lora["name"] for lora in meta["loras"]] == ["linked-style"]
    with pytest.raises(AppError, match="LoRA broken") as refusal:
        call(client, seed="4", lora_1="broken.safetensors")
    assert "/" not in str(refusal.value), refusal.value  # no folder of the server, only the file's name


def test_a_request_without_a_session_is_answered_without_a_traceback(server, capfd):
    """``POST /run/cancel`` with no session was a 500 and ~30 lines of traceback each time (cheap
    log flooding); a generation without one is refused with what to use instead."""
    from tests.app_requests import settings as defaults

    config = httpx.get(f"{server}config", timeout=30).json()
    index = {d.get("api_name"): d["id"] for d in config["dependencies"]}
    capfd.readouterr()
    for _ in range(3):
        answer = httpx.post(f"{server}gradio_api/run/cancel", json={"data": [], "fn_index": index["cancel"]})
        assert answer.status_code == 200 and "Nothing to cancel" in answer.json()["data"][0], answer.text
    answer = httpx.post(
        f"{server}gradio_api/run/predict",
        json={"data": list(defaults().values()), "fn_index": index["generate"]},
        timeout=60,
    )
    # gradio's /run routes answer an app's refusal with status 500 and the message as JSON
    assert "came without a session" in answer.json()["error"] and "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize(
    "flag", ["--models_dir", "--dit", "--t5", "--clip", "--pretrained_model", "--id_image", "--out"]
)
def test_a_path_no_system_can_hold_is_refused_by_the_flag(flag, capsys):
    """A name over 255 bytes made ``Path.exists()`` raise "File name too long" as a traceback in
    the download tool, the CLI and the app."""
    import pulid.serve.download
    from pulid.serve import cli

    too_long = "/tmp/" + "a" * 300 + ".gguf"
    doors = [lambda argv: cli.main(["--prompt", "x", *argv]), app_flux_parse_args]
    if flag in ("--models_dir", "--dit", "--t5", "--clip"):
        doors.append(lambda argv: pulid.serve.download.main(["--dry-run", *argv]))
    for door in doors:
        if door is app_flux_parse_args and flag in ("--id_image", "--out"):
            continue
        with pytest.raises(SystemExit) as stop:
            door([flag, too_long])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: the name aaaa" in err and "is 305 bytes long" in err, err
        assert "Traceback" not in err
    with pytest.raises(SystemExit):
        cli.main(["--prompt", "x", "--out", "/tmp/" + "b" * 5000])
    assert "a path has at most 4,096" in capsys.readouterr().err


def app_flux_parse_args(argv):
    from pulid.serve import gradio_app

    return gradio_app.parse_args(argv)
