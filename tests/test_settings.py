"""The generation settings are declared once, and every surface is made from that declaration."""

import math
import re

import pytest

from pulid.request import GenerationRequest, InvalidRequestError, generation_settings
from pulid.serve import cli, components
from pulid.settings import Setting

SETTINGS = generation_settings()
NUMERIC = [s for s in SETTINGS if s.kind is not str]


def test_the_declaration_is_the_request_dataclass():
    import dataclasses

    fields = [
        f.name
        for f in dataclasses.fields(GenerationRequest)
        if f.name not in ("id_images", "loras", "init_image", "mask", "more_people", "id_region")
    ]
    assert [s.name for s in SETTINGS] == fields
    assert all(s.label and (s.kind in (int, float, str)) for s in SETTINGS)
    for setting in SETTINGS:  # every default is a value of its own setting
        assert setting.coerce(setting.default) == setting.default


def test_the_command_line_flags_are_the_declared_settings():
    args = cli.parse_args(["--prompt", "x"])
    for setting in SETTINGS:
        assert hasattr(args, setting.name)
    # the official spelling works too, and values are checked by the declaration
    args = cli.parse_args(["--prompt", "x", "--timestep_to_start_cfg", "3", "--num_steps", "4"])
    assert args.requests[0].cfg_start_step == 3 and args.requests[0].num_steps == 4


@pytest.mark.parametrize("flag,value", [("--num_steps", "2.5"), ("--width", "1e400"), ("--guidance", "nan")])
def test_a_bad_flag_value_is_refused_by_the_command_line_before_loading(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(["--prompt", "x", flag, value])
    assert exit_.value.code == 2
    label = {s.name: s.label for s in SETTINGS}[flag[2:]]
    assert f"{label} must be" in capsys.readouterr().err


def test_the_api_and_controls_are_the_declared_settings(client):
    api = client.view_api(return_format="dict")["named_endpoints"]["/generate"]["parameters"]
    by_name = {p["parameter_name"]: p for p in api}
    settings = [s.name for s in SETTINGS if s.name != "prompt" and s.group != "people"]
    loras = components.lora_input_names()
    people = components.people_input_names()
    # Parameters added later come last, so that positional callers of the earlier ones keep working.
    assert list(by_name) == [
        "prompt",
        "id_image",
        "extra_images",
        *settings,
        *loras,
        "init_image",
        "mask",
        "layout",
        "id_region",
        *people,
        "mask_drawing",
        "region_drawing",
    ]
    assert people[:3] == ["person_2", "person_2_weight", "person_2_region"] and len(people) == 9
    for setting in SETTINGS:
        default = by_name[setting.name]["parameter_default"]
        assert setting.coerce(default) == setting.default, setting.name
    for name in loras:  # no LoRA by default, strength 1 (the declared LoRA strength)
        assert by_name[name]["parameter_default"] in ("", 1.0), (name, by_name[name]["parameter_default"])


def test_png_metadata_records_every_setting(tmp_path):
    from PIL import Image

    from pulid.outputs import read_image_metadata, save_image

    request = GenerationRequest(prompt="a", seed=5)
    path = save_image(Image.new("RGB", (8, 8)), request.settings(), tmp_path / "x.png")
    meta = read_image_metadata(path)
    assert {s.name for s in SETTINGS} | {"num_id_images"} == set(meta)
    assert GenerationRequest.from_values(**{s.name: meta[s.name] for s in SETTINGS}) == request


@pytest.mark.parametrize("setting", NUMERIC, ids=lambda s: s.name)
def test_every_number_is_checked_at_its_bounds_and_against_hostile_values(setting: Setting):
    if setting.choices:
        inside, outside = list(setting.choices), [min(setting.choices) - 1, max(setting.choices) + 1]
    else:
        inside, outside = [setting.minimum, setting.maximum], [setting.minimum - 1, setting.maximum + 1]
        if setting.multiple_of:
            outside.append(setting.minimum + setting.multiple_of // 2)
    for value in inside:
        assert setting.coerce(value) == value and setting.coerce(str(value)) == value
    hostile = [*outside, "1e400", float("inf"), float("-inf"), float("nan"), None, True, "abc", [], {}]
    hostile += ["9" * 5000, "-" + "1" * 5000, "0." + "5" * 5000]  # past int()'s 4,300-digit limit
    if setting.kind is int:
        hostile += [2.5, "2.5", 10**30]
    for value in hostile:
        with pytest.raises(InvalidRequestError, match="^" + re.escape(f"{setting.label} must be")):
            setting.coerce(value)
    assert setting.coerce("") == setting.default  # an emptied box


def test_floats_accept_numbers_and_ints_accept_whole_floats():
    declared = {s.name: s for s in SETTINGS}
    assert declared["guidance"].coerce("3.5") == 3.5 and declared["guidance"].coerce(3) == 3.0
    assert declared["num_steps"].coerce(4.0) == 4 and isinstance(declared["num_steps"].coerce(4.0), int)
    assert declared["seed"].coerce("42.0") == 42 and declared["seed"].coerce(str(2**64 - 1)) == 2**64 - 1
    assert declared["seed"].coerce("12345678901234567891.0") == 12345678901234567891  # exact, not via a float
    # whole numbers in plain ASCII digits only: nothing that int()/float() would read another way
    for loose in ("1e3", "1_000", "\u0663", "0x10", float(2**60)):
        with pytest.raises(InvalidRequestError, match="Seed .* must be a whole number"):
            declared["seed"].coerce(loose)
    with pytest.raises(InvalidRequestError, match="Guidance must be"):
        declared["guidance"].coerce("3_5")


def test_text_that_is_not_valid_unicode_is_refused_by_name():
    declared = {s.name: s for s in SETTINGS}
    for name in ("prompt", "neg_prompt"):
        with pytest.raises(InvalidRequestError, match="holds characters that are not valid Unicode"):
            declared[name].coerce("a portrait \ud800")
    assert declared["prompt"].coerce("caf\u00e9 \U0001f600") == "caf\u00e9 \U0001f600"
    assert not math.isnan(declared["true_cfg"].coerce(1))


def test_unknown_settings_and_several_problems_are_reported_together():
    with pytest.raises(InvalidRequestError, match="Unknown setting"):
        GenerationRequest.from_values(prompt="a", steps=3)
    with pytest.raises(InvalidRequestError) as err:
        GenerationRequest.from_values(prompt="a", width=1000, num_steps=0)
    assert "Width" in str(err.value) and "Number of steps" in str(err.value)


def test_the_same_lora_twice_is_refused_with_what_to_change():
    with pytest.raises(InvalidRequestError, match="'style.safetensors' is chosen twice"):
        GenerationRequest(
            prompt="a", loras=[("style.safetensors", 0.5), ("style.safetensors", 0.5)]
        ).checked()


def test_a_prompts_file_skips_blank_lines_and_comments(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a portrait\n\n# a note to self\n   # indented note\nwatercolor, #2 pencil\n")
    args = cli.parse_args(["--preset", "tiny-random", "--prompts_file", str(prompts)])
    assert [request.prompt for request in args.requests] == ["a portrait", "watercolor, #2 pencil"]
