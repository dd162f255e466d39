"""Image files: the A1111 text PNG-info readers parse, JSON read back exactly, formats, pruning."""

import json
import re

import pytest
from PIL import Image

from pulid.outputs import (
    a1111_parameters,
    output_name,
    prune_outputs,
    read_a1111_parameters,
    read_image_metadata,
    save_image,
    save_new_image,
)
from pulid.request import GenerationRequest

# AUTOMATIC1111's own reading of the last line (modules/infotext_utils.py): key: value pairs, a value
# either quoted JSON text or running to the next comma. Written here independently as a regex.
A1111_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_a1111(text: str) -> tuple[str, str, dict]:
    """As A1111 reads it: stripped lines, the prompt until a line starts ``Negative prompt:``, every
    line after that the negative prompt, the last line the fields when it has three or more."""
    *head, last = text.strip().split("\n")
    if len(A1111_PAIR.findall(last)) < 3:
        head, last = [*head, last], ""
    prompt_lines, negative_lines = [], []
    for line in head:
        line = line.strip()
        if line.startswith("Negative prompt:") and not negative_lines:
            negative_lines.append(line[len("Negative prompt:") :].strip())
        elif negative_lines:
            negative_lines.append(line)
        else:
            prompt_lines.append(line)
    fields = {}
    for key, value in A1111_PAIR.findall(last):
        fields[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    return "\n".join(prompt_lines), "\n".join(negative_lines), fields


def comfyui_reads(path) -> tuple[str, str]:
    """What ComfyUI's loader does with a dropped PNG (``app.handleFile``): a ``workflow`` chunk,
    else a ``prompt`` chunk, is loaded as its graph; only without both is ``parameters`` read."""
    with Image.open(path) as image:
        text = dict(image.text)
    for key in ("workflow", "prompt", "parameters"):
        if key in text:
            return key, text[key]
    return "", ""


def metadata(**changes):
    request = GenerationRequest(prompt="portrait, color: cinematic", seed=42, **changes)
    return {
        **request.settings(),
        "seed": 42,
        "model": "flux-dev",
        "pulid_version": "v0.9.1",
        "face_similarity": "0.71",
    }


def test_the_a1111_text_parses_back_to_the_settings():
    meta = metadata(true_cfg=3.5, neg_prompt="bad, blurry", width=1024, height=768, num_steps=20)
    prompt, negative, fields = parse_a1111(a1111_parameters(meta))
    assert prompt == "portrait, color: cinematic" and negative == "bad, blurry"
    assert fields["Steps"] == "20" and fields["Seed"] == "42" and fields["Size"] == "1024x768"
    assert fields["Sampler"] == "Euler" and float(fields["CFG scale"]) == 3.5
    assert float(fields["Distilled CFG Scale"]) == 4.0 and fields["Model"] == "flux-dev"
    assert fields["PuLID"] == "v0.9.1" and float(fields["PuLID weight"]) == 1.0
    assert fields["PuLID start step"] == "0" and fields["Face similarity"] == "0.71"


def test_the_negative_prompt_is_written_only_when_true_cfg_reads_it():
    _, negative, fields = parse_a1111(a1111_parameters(metadata(neg_prompt="blurry")))
    assert negative == "" and float(fields["CFG scale"]) == 1.0


def test_a_value_with_commas_or_colons_is_quoted_as_a1111_does():
    meta = {**metadata(), "model": 'flux, "dev": 1'}
    _, _, fields = parse_a1111(a1111_parameters(meta))
    assert fields["Model"] == 'flux, "dev": 1'


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_every_format_keeps_both_records(tmp_path, suffix):
    meta = metadata(neg_prompt="ünïcode ☃", true_cfg=2.0)
    path = save_image(Image.new("RGB", (32, 24), (10, 200, 30)), meta, tmp_path / f"x{suffix}", 90)
    assert read_image_metadata(path) == json.loads(json.dumps(meta))
    prompt, negative, fields = parse_a1111(read_a1111_parameters(path))
    assert prompt == meta["prompt"] and negative == "ünïcode ☃" and fields["Seed"] == "42"
    with Image.open(path) as image:
        assert image.size == (32, 24)


def test_names_sort_by_time_and_never_collide(tmp_path):
    image = Image.new("RGB", (4, 4))
    paths = [save_new_image(image, {"seed": 1, "prompt": "a"}, tmp_path, 3, "jpeg") for _ in range(3)]
    assert len({p.name for p in paths}) == 3 and all(p.suffix == ".jpg" for p in paths)
    assert output_name({"seed": 5, "prompt": "../../etc/x"}, 2).endswith("-0002-seed5-etc-x.png")


def test_a_save_that_fails_leaves_no_file_behind(tmp_path, monkeypatch):
    import pulid.outputs

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pulid.outputs, "save_image", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_new_image(Image.new("RGB", (4, 4)), {"seed": 1, "prompt": "a"}, tmp_path, 1)
    assert list(tmp_path.iterdir()) == []  # the claimed name is let go, not kept as an empty image


def test_pruning_keeps_the_newest_and_touches_nothing_else(tmp_path):
    image = Image.new("RGB", (4, 4))
    made = [save_new_image(image, {"seed": i, "prompt": "p"}, tmp_path, i) for i in range(1, 8)]
    (tmp_path / "notes.txt").write_text("mine")
    deleted = prune_outputs(tmp_path, keep=3)
    assert deleted == made[:4]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(p.name for p in made[4:]), "notes.txt"])
    assert prune_outputs(tmp_path, keep=0) == []


def test_an_image_without_settings_says_so(tmp_path):
    from pulid.outputs import read_image_metadata

    for suffix in (".png", ".jpg"):
        bare = tmp_path / f"bare{suffix}"
        Image.new("RGB", (4, 4)).save(bare)
        with pytest.raises(ValueError, match=f"bare{re.escape(suffix)} holds no PuLID-FLUX settings"):
            read_image_metadata(bare)


@pytest.mark.parametrize(
    "prompt",
    [
        '{"3": {"class_type": "SaveImage", "inputs": {"filename_prefix": "../../pwned"}}}',
        "a plain portrait",
    ],
)
def test_comfyui_reads_the_a1111_text_never_a_prompt_as_its_graph(tmp_path, prompt):
    meta = {**metadata(), "prompt": prompt, "workflow": "{}"}  # a setting named like ComfyUI's chunks
    path = save_image(Image.new("RGB", (8, 8)), meta, tmp_path / "x.png")
    key, text = comfyui_reads(path)
    assert key == "parameters" and parse_a1111(text)[0] == prompt
    with Image.open(path) as image:
        assert set(image.text) == {"parameters", "pulid_flux", "Software"}
    assert read_image_metadata(path)["prompt"] == prompt  # the JSON still has every setting


@pytest.mark.parametrize("true_cfg", [1.0, 3.5])
@pytest.mark.parametrize(
    "prompt",
    [
        "portrait\nNegative prompt: blurry, watermark",
        "portrait\r\n  Negative prompt: blurry\nSteps: 99, Seed: 1, Size: 8x8",
        "Negative prompt: blurry",
        "a\u2028Negative prompt: b",
    ],
)
def test_a_prompt_cannot_write_a_negative_prompt_or_fields_into_the_a1111_text(prompt, true_cfg):
    meta = metadata(true_cfg=true_cfg, neg_prompt="used\nNegative prompt: twice")
    meta["prompt"] = prompt
    read_prompt, negative, fields = parse_a1111(a1111_parameters(meta))
    words = " ".join(prompt.split())
    assert read_prompt in (words, json.dumps(words, ensure_ascii=False))  # one line; quoted if needed
    assert negative == ("used Negative prompt: twice" if true_cfg > 1 else "")
    assert fields["Steps"] == "28" and fields["Seed"] == "42"
