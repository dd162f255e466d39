"""The page's inputs: gradio components that check what they are sent before anything reads it.

Every file input takes only uploads of this app (gradio would fetch a URL or read any path on the
server), and hands on the uploaded file, not pixels: the service checks its header at once and
decodes it when the job's turn comes. Sliders and radios check their value by the declared
setting; dropdowns take only their listed choices. A refusal is :func:`refused`: the visitor's
message, one line in the server's log.
"""

from __future__ import annotations

import functools
import logging

import gradio as gr
from gradio.utils import get_upload_folder

from pulid.images import MAX_CANVAS_LAYERS, ImageError, painted_layer
from pulid.limits import MAX_EXTRA_PHOTOS, MAX_PEOPLE
from pulid.regions import painted_regions
from pulid.request import LORA_STRENGTH, PERSON_WEIGHT, generation_settings, painted_mask
from pulid.serve.uploads import check_upload
from pulid.settings import InvalidRequestError, Setting, shown

logger = logging.getLogger(__name__)

LORA_ROWS = 3  # LoRA pickers in the UI (the Python API and the CLI take up to MAX_LORAS_PER_REQUEST)
PAINTING_BY_ID = (
    "The painting came without its layers: send each painted layer as an uploaded file (the page "
    "does); drawings sent ahead of a request are not kept."
)


def refused(message: str) -> gr.Error:
    """The error a visitor sees for a request that cannot be served as sent: one log line on the
    server, not gradio's traceback (an ordinary user mistake is not a crash)."""
    logger.info("refused a request: %s", message[:300])
    return gr.Error(message, print_exception=False, duration=None)  # stays until the visitor closes it


def cancelled(message: str) -> gr.Error:
    """How a request cancelled before any image ends: an API caller gets the error, while the page,
    whose status line already says "Cancelled", shows no error box for what the visitor chose."""
    return gr.Error(message, print_exception=False, visible=False)


def uploaded(payload) -> None:
    """Refuse, before gradio opens anything, a file input that is not an upload of this app."""
    path = getattr(payload, "path", None)
    if path is None:
        raise refused("Upload the photo itself (links and paths on the server are not read).")
    try:
        check_upload(path, [get_upload_folder()])
    except ImageError as err:
        raise refused(str(err)) from None


class UploadedImage(gr.Image):
    """An image input that takes only uploads, handed on as the uploaded file's path."""

    is_template = True  # rendered by the front end's own Image component

    def preprocess(self, payload):
        if payload is None:
            return None
        uploaded(payload)
        return payload.path


class Photos(gr.File):
    """Photos of one person: uploads of this app only, counted before any is looked at."""

    is_template = True

    def preprocess(self, payload):
        items = payload.root if hasattr(payload, "root") else [payload] if payload is not None else []
        if len(items) > MAX_EXTRA_PHOTOS + 1:
            raise refused(
                f"{len(items)} photos were sent for one person; at most {MAX_EXTRA_PHOTOS + 1} "
                "are used: keep the best."
            )
        for item in items:
            uploaded(item)
        return super().preprocess(payload)

    def example_payload(self):
        return None  # gradio's own example is a remote PDF

    def example_value(self):
        return None


class Painting(gr.ImageEditor):
    """Strokes painted in the page, handed on as ``read(layers)`` of their RGBA layers (the
    subclasses: a mask, or each person's region). Only the painted layers are read (never the
    background, nor a file that was not uploaded), bounded in count, size and pixels. The page
    sends them as uploads with the request; gradio's route for pieces sent ahead (``accept_blobs``,
    which would keep them in memory for anyone) is not offered: it answers 404."""

    is_template = True
    accept_blobs = None  # not a server function: gradio's component route answers 404

    def get_block_name(self) -> str:  # the front end's own image editor, for the subclasses too
        return "imageeditor"

    def get_block_class(self) -> str:
        return "imageeditor"

    @staticmethod
    def read(layers):
        raise NotImplementedError

    def preprocess(self, payload):
        if payload is None:
            return None
        if payload.id is not None and not payload.layers:
            raise refused(PAINTING_BY_ID)
        try:
            for layer in payload.layers:  # files, which must be uploads of this app
                uploaded(layer)
            sources = [layer.path for layer in payload.layers[:MAX_CANVAS_LAYERS]]
            layers = [painted_layer(source, "the painting") for source in sources]
        except ImageError as err:
            raise refused(str(err)) from None
        return self.read(layers)

    def example_payload(self):
        return None

    def example_value(self):
        return None


class MaskPainting(Painting):
    """What to repaint, painted over the photo to start from: a mask, or None."""

    read = staticmethod(painted_mask)


class RegionPainting(Painting):
    """Where each person stands, painted in the brush colours: a region or None per person."""

    @staticmethod
    def read(layers):
        return painted_regions(layers, MAX_PEOPLE)


@functools.cache
def declared_setting(name: str) -> Setting:
    """The setting a control checks its value by (the LoRA and person rows' too), looked up once
    per name: every control's check of every request asks."""
    return {s.name: s for s in (*generation_settings(), LORA_STRENGTH, PERSON_WEIGHT)}[name]


def _checked_by_setting(base: type[gr.components.Component]) -> type[gr.components.Component]:
    """``base`` (a slider or a radio) whose value, from the page or the API, is checked by its
    declared setting: a wrong one (a string, NaN, out of range, not a choice) is refused with the
    setting named and the value cut short, where gradio's own check says "Value 0 is less than
    minimum value 256", echoes a megabyte of text or fails on a string."""

    class CheckedBySetting(base):
        is_template = True

        def __init__(self, *, setting_name: str = "", **kwargs):
            # the setting's name as a keyword: gradio rebuilds a component from its constructor's
            # keywords when an event updates it (so ``__init__`` is in the class body gradio wraps)
            self.setting_name = setting_name
            super().__init__(**kwargs)

        def get_config(self, cls=None):
            return super().get_config(cls or base)  # the page's own control: the base's properties

        def preprocess(self, payload):
            try:
                return declared_setting(self.setting_name).coerce(payload)
            except InvalidRequestError as err:
                raise refused(str(err)) from None

    CheckedBySetting.__name__ = CheckedBySetting.__qualname__ = f"Setting{base.__name__}"
    return CheckedBySetting


SettingSlider = _checked_by_setting(gr.Slider)
SettingRadio = _checked_by_setting(gr.Radio)


class ListedChoice(gr.Dropdown):
    """A dropdown whose value must be one of its listed choices (those of the visitor's page, after
    a refresh); anything else is refused with the control named and the value cut short."""

    is_template = True

    def get_config(self, cls=None):
        return super().get_config(cls or gr.Dropdown)

    def preprocess(self, payload):
        listed = [value for _, value in self.choices]
        if payload in listed or (payload in (None, "") and "" in listed):
            return payload
        raise refused(
            f"{self.label} must be one of the listed choices (got {shown(payload)}): pick one from the list."
        )


def control(setting: Setting, visible: bool = True, **options) -> gr.components.Component:
    """The control of one declared setting: a textbox, a radio or a slider, checked on use."""
    common = dict(label=setting.label, info=setting.help or None, visible=visible, **options)
    if setting.widget == "textbox":
        return gr.Textbox(value=str(setting.default), max_length=setting.max_length, **common)
    if setting.widget == "radio":  # the choices by keyword: gradio records a control's keywords
        return SettingRadio(
            choices=list(setting.choices), value=setting.default, setting_name=setting.name, **common
        )
    low, high = (
        (min(setting.choices), max(setting.choices))
        if setting.choices
        else (setting.minimum, setting.maximum)
    )
    return SettingSlider(
        minimum=low,
        maximum=high,
        value=setting.default,
        step=setting.step,
        setting_name=setting.name,
        **common,
    )


def lora_input_names() -> list[str]:
    """The LoRA rows' inputs: ``lora_1``, ``lora_1_strength``, ``lora_2``, ..."""
    return [name for row in range(1, LORA_ROWS + 1) for name in (f"lora_{row}", f"lora_{row}_strength")]


def people_input_names() -> list[str]:
    """The other people's inputs: ``person_2``, ``person_2_weight``, ``person_2_region``, ..."""
    return [
        name
        for number in range(2, MAX_PEOPLE + 1)
        for name in (f"person_{number}", f"person_{number}_weight", f"person_{number}_region")
    ]


def input_names() -> list[str]:
    """The /generate endpoint's parameters, in order: the prompt, the photos, every other
    declared setting in declaration order, then the LoRA rows; what came later is appended, so
    that the API's earlier parameters keep their positions."""
    return (
        ["prompt", "id_image", "extra_images"]
        + [s.name for s in generation_settings() if s.name != "prompt" and s.group != "people"]
        + lora_input_names()
        + ["init_image", "mask"]
        + [s.name for s in generation_settings() if s.group == "people"]
        + ["id_region"]
        + people_input_names()
        + ["mask_drawing", "region_drawing"]
    )
