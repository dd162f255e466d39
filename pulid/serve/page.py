"""The page: its layout, and each control wired to what it does (:mod:`pulid.serve.handlers`).

The controls are made from the declared generation settings (:mod:`pulid.request`); the inputs
that check what they are sent are :mod:`pulid.serve.components`. :mod:`pulid.serve.gradio_app`
serves the page this builds.
"""

import argparse
import dataclasses
from pathlib import Path

import gradio as gr

from pulid.catalogue import SPEED_LORAS
from pulid.limits import MAX_EXTRA_PHOTOS, MAX_PEOPLE, MAX_QUEUED
from pulid.regions import PALETTE
from pulid.request import LORA_STRENGTH, PERSON_WEIGHT, SIZE_PRESETS, generation_settings
from pulid.serve import handlers as on
from pulid.serve.components import (
    LORA_ROWS,
    ListedChoice,
    MaskPainting,
    Photos,
    RegionPainting,
    UploadedImage,
    control,
    input_names,
)
from pulid.similarity import NO_ID_PHOTO

EXAMPLE_PHOTO = Path(__file__).resolve().parents[2] / "example_inputs" / "astronaut.png"
UPLOAD_CACHE = (600, 3600)  # every 10 minutes, delete uploads and outputs older than an hour
TINY_START = {"width": 256, "height": 256, "num_steps": 4}  # the tiny preset's page: an image in seconds
EXAMPLES = [  # prompt, ID start step, guidance, seed: photoreal scenes start at 4, stylised at 0-1
    ("portrait, color, cinematic", 0, 4.0, "42"),
    ("a woman in a red raincoat on a rainy Tokyo street at night, film photo, 35mm", 4, 4.0, "7"),
    ("portrait, pixar style, 3d render, soft light", 1, 4.0, "12"),
    ("watercolor painting of a woman in a sunflower field", 0, 4.0, "3"),
]
TIPS_FOR = ("start_step", "true_cfg")  # the settings whose advice the page shows under the controls


def tips() -> str:
    """The advice of :data:`TIPS_FOR`, as declared with each setting."""
    chosen = [s for s in generation_settings() if s.name in TIPS_FOR]
    return "\n".join(f"- **{s.label}**: {s.help}" for s in chosen)


PRESET_NOTICE = (
    "**tiny-random preset: random tiny models on the CPU, so the images are noise.** It is for "
    "trying the page and the API without downloading 38 GB of weights, and starts at "
    f"{TINY_START['width']} x {TINY_START['height']} and {TINY_START['num_steps']} steps (a few "
    "seconds). For real images, get the weights (README, *Weights*) and start without `--preset`."
)
# A canvas to paint over a background the app sets: one layer, no upload, no crop or resize.
PAINT_OVER = dict(type="numpy", image_mode="RGBA", sources=(), transforms=(), layers=False)


# Run in the page as Generate is pressed, before the request leaves: the status line says so at once
# (the server's first line replaces it). The inputs go on unchanged.
SHOW_SENDING = """(...inputs) => {
  const line = document.querySelector("#result-info .md");
  if (line) line.innerHTML = '<p><progress max="1"></progress> <strong>Sending the request</strong></p>';
  return inputs;
}"""
# Counts the status line's times on in the page (up since the click, down to the end), so that the
# server sends the line only when its stage changes. Gradio draws each new line afresh.
CLOCK_SCRIPT = r"""<style>
#result-info progress { width: 8em; height: 0.8em; vertical-align: middle; accent-color: #f97316; }
</style>
<script>
(() => {
  const shown = (s) => { s = Math.max(0, Math.round(s));
    return s < 60 ? `${s} s` : `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`; };
  setInterval(() => {
    const now = Date.now();
    for (const el of document.querySelectorAll(".job-clock, .job-left")) {
      if (!el.dataset.since) el.dataset.since = now;
      const sent = [...el.classList].find((c) => /^t\d+$/.test(c));
      if (!sent) continue;
      const passed = (now - Number(el.dataset.since)) / 1000;
      if (el.classList.contains("job-clock")) {
        el.textContent = shown(Number(sent.slice(1)) / 10 + passed);
      } else {
        const left = Number(sent.slice(1)) / 10 - passed;
        el.textContent = left >= 1 ? `about ${shown(left)} left` : "almost done";
      }
    }
  }, 250);
})();
</script>"""


def create_demo(args: argparse.Namespace, service):
    """The page: its layout, each control wired to a handler (:mod:`pulid.serve.handlers`)."""
    page = on.PageHandlers(service, args)
    settings = {s.name: s for s in generation_settings()}
    controls: dict = {}
    with gr.Blocks(title="PuLID for FLUX", delete_cache=UPLOAD_CACHE) as demo:
        gr.Markdown("## PuLID for FLUX · put the face from a photo into new FLUX.1-dev images")
        if args.preset == "tiny-random":
            gr.Markdown(PRESET_NOTICE, elem_id="preset-notice")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=420):
                controls["prompt"] = control(settings["prompt"], lines=2, elem_id="prompt")
                with gr.Row():
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel_button = gr.Button("Cancel", elem_id="cancel")
                # the request's status while it waits and runs (stage, times), then what it made
                info = gr.Markdown(elem_id="result-info")
                notice = photo_inputs(controls, settings)
                with gr.Row():
                    randomize = gr.Button("Random seed", size="sm")
                    reuse = gr.Button("Use the selected image's seed", size="sm")
                edit_panel(controls, settings)
                people_panel(controls, settings)
                speed_buttons, refresh = lora_panel(controls, page.lora_choices())
            with gr.Column(scale=6, min_width=420):
                results = gr.Gallery(
                    label="Results",
                    columns=2,
                    height=430,
                    object_fit="contain",
                    elem_id="results",
                    format="png",
                )
                # right under the results, where a user looks to change what comes out next
                with gr.Accordion("Size, steps and guidance", open=True, elem_id="size"):
                    preset = ListedChoice(
                        ["custom", *SIZE_PRESETS],
                        value=next(iter(SIZE_PRESETS)),
                        label="Size preset",
                        info="Sets width and height; pick 'custom' to use the sliders alone.",
                    )
                    group_controls(controls, settings, "image")
                files = gr.File(label="Files (with prompt and settings inside)", file_count="multiple")
                debug_gallery = gr.Gallery(label="Detected, aligned and parsed face", visible=args.dev)
        with gr.Row(equal_height=False):
            with gr.Column(), gr.Accordion("Advanced: T5 length, true CFG", open=False):
                gr.Markdown(tips())
                group_controls(controls, settings, "advanced")
                group_controls(controls, settings, "dev", visible=args.dev)
            with gr.Column(), gr.Accordion("Output format", open=False):
                group_controls(controls, settings, "output")
        with gr.Accordion("This session's images (select one to see its settings)", open=False):
            history_gallery = gr.Gallery(columns=6, height=300, object_fit="contain", elem_id="history")
            picked = gr.Markdown()
            picked_settings = gr.JSON(label="Settings of the selected image")
            picked_seed = gr.State(None)
        result_details = gr.JSON(label="Result details", visible=False)
        latest, history = gr.State([]), gr.State([])
        if EXAMPLE_PHOTO.is_file():
            gr.Examples(
                [[prompt, str(EXAMPLE_PHOTO), *rest] for prompt, *rest in EXAMPLES],
                inputs=[controls[name] for name in ("prompt", "id_image", "start_step", "guidance", "seed")],
                label="Examples (photoreal prompts start the ID at step 4, stylised ones at 0-1)",
            )
        names = input_names()
        if missing := set(names) ^ set(controls):
            raise RuntimeError(f"the UI and the declared settings disagree on: {sorted(missing)}")

        # -- wiring ---------------------------------------------------------------------------------
        private = dict(api_visibility="private")
        event = generate_button.click(
            on.with_signature(page.generate, names),
            inputs=[controls[name] for name in names],
            outputs=[results, info, files, result_details, debug_gallery, latest],
            api_name="generate",
            js=SHOW_SENDING,
            show_progress="hidden",  # the status line under Generate says it, and stays on screen
            # Every admitted request enters its handler at once and waits in the service's line,
            # which bounds each visitor's share; gradio's own queue only holds the overflow.
            concurrency_limit=MAX_QUEUED + 1,
        )
        event.success(page.add_to_history, [latest, history], [history, history_gallery], **private)
        cancel_button.click(page.cancel, None, info, api_name="cancel", queue=False)
        randomize.click(lambda: "-1", None, controls["seed"], **private)
        reuse.click(
            lambda seed, current: current if seed is None else str(seed),
            [picked_seed, controls["seed"]],
            controls["seed"],
            **private,
        )
        shown_pick = [picked_seed, picked, picked_settings]
        history_gallery.select(page.pick, history, shown_pick, **private)
        results.select(page.pick, latest, shown_pick, **private)
        width, height = controls["width"], controls["height"]
        if args.preset == "tiny-random":  # the page starts small; the API's defaults stay the declared ones
            starting = [controls[name] for name in TINY_START] + [preset]
            demo.load(lambda: (*TINY_START.values(), "custom"), None, starting, **private)
        preset.change(on.size_of, preset, [width, height], **private)
        for side in (width, height):  # a size set by hand is no longer the preset's
            side.input(lambda: "custom", None, preset, **private)
        controls["id_image"].change(on.photo_notice, controls["id_image"], notice, **private)
        start = controls["init_image"]
        start.change(lambda path: path, start, controls["mask_drawing"], **private)
        start.upload(on.match_photo, [start, width, height], [width, height, preset], **private)
        regions = [controls["id_region"], controls["region_drawing"]]
        regions += [controls[f"person_{number}_region"] for number in range(2, MAX_PEOPLE + 1)]
        for source in (start, width, height):  # regions are painted over the photo, or the image's shape
            source.change(on.canvas_background, [start, width, height], controls["region_drawing"], **private)
        controls["layout"].change(  # the regions matter with 'masks' only
            lambda layout: [gr.update(visible=layout == "masks")] * len(regions),
            controls["layout"],
            regions,
            **private,
        )
        pickers = [controls[f"lora_{row}"] for row in range(1, LORA_ROWS + 1)]
        refresh.click(page.refresh_loras, pickers, pickers, **private)
        first_row = [
            controls["lora_1"],
            controls["lora_1_strength"],
            controls["num_steps"],
            controls["guidance"],
        ]
        for name, button in speed_buttons.items():
            button.click(lambda name=name: on.speed_preset(name), None, first_row, **private)
    return demo.queue(default_concurrency_limit=1, max_size=MAX_QUEUED)


def group_controls(controls: dict, settings: dict, group: str, visible: bool = True) -> None:
    """The controls of every declared setting of ``group``, in declaration order."""
    for name, setting in settings.items():
        if setting.group == group:
            controls[name] = control(setting, visible=visible)


def photo_inputs(controls: dict, settings: dict):
    """The ID photo, more photos of the same person, the ID weight, start step, count and seed;
    returns the notice shown while there is no photo."""
    with gr.Row(equal_height=False):
        controls["id_image"] = UploadedImage(
            label="ID photo", type="filepath", height=230, elem_id="id-image"
        )
        with gr.Column(min_width=160):
            notice = gr.Markdown(
                f"**{NO_ID_PHOTO}**: the image will be plain FLUX.1-dev. "
                "Add a photo of a face to put that person in it.",
                elem_id="no-photo-notice",
            )
            controls["extra_images"] = Photos(
                label=f"More photos of the same person (optional, up to {MAX_EXTRA_PHOTOS})",
                file_count="multiple",
                file_types=["image"],
                type="filepath",
                height=120,
            )
    with gr.Row():
        controls["id_weight"] = control(settings["id_weight"])
        controls["start_step"] = control(settings["start_step"])
    with gr.Row(equal_height=True):
        controls["num_images"] = control(settings["num_images"])
        controls["seed"] = control(settings["seed"], elem_id="seed")
    return notice


def edit_panel(controls: dict, settings: dict) -> None:
    """Start from a photo: the photo, a mask uploaded or painted over it, the strength."""
    with gr.Accordion("Start from a photo (image to image)", open=False, elem_id="edit"):
        gr.Markdown(
            "The image starts from this photo instead of noise. Choosing it sets the size to its "
            "shape. Strength 1 ignores it; lower keeps more of it. To repaint only part of it, paint "
            "over it below, or upload a mask (white repaints, black keeps), or choose 'face' to "
            "repaint its largest face."
        )
        with gr.Row(equal_height=False):
            controls["init_image"] = UploadedImage(
                label="Photo to start from", type="filepath", height=200, elem_id="init-image"
            )
            controls["mask"] = UploadedImage(
                label="Mask (optional): white repaints", type="filepath", height=200, elem_id="mask"
            )
        controls["mask_drawing"] = MaskPainting(
            label="Paint what to repaint (optional)",
            **PAINT_OVER,
            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
            height=320,
            elem_id="mask-drawing",
        )
        with gr.Row():
            group_controls(controls, settings, "edit")


def people_panel(controls: dict, settings: dict) -> None:
    """Persons 2 to MAX_PEOPLE: photos, ID weight and region each; the layout; the region canvas."""
    with gr.Accordion(f"Several people (up to {MAX_PEOPLE})", open=False, elem_id="people"):
        gr.Markdown(
            "The ID photo above is person 1; add the others here, each with their own photos and ID "
            "weight. With 'columns' they stand side by side in this order, left to right; with "
            "'masks' each goes where their region is white (regions are drawn over the image, or "
            "over the photo to start from). Say in the prompt how many people there are."
        )
        group_controls(controls, settings, "people")
        masks = settings["layout"].default == "masks"
        controls["id_region"] = UploadedImage(
            label="Person 1's region (white: where they stand)",
            type="filepath",
            height=140,
            elem_id="id-region",
            visible=masks,
        )
        for number in range(2, MAX_PEOPLE + 1):
            with gr.Row(equal_height=False):
                controls[f"person_{number}"] = Photos(
                    label=f"Person {number}: photos of their face",
                    file_count="multiple",
                    file_types=["image"],
                    type="filepath",
                    height=140,
                    elem_id=f"person-{number}",
                )
                with gr.Column(min_width=160):
                    weight = dataclasses.replace(PERSON_WEIGHT, label=f"Person {number}: ID weight")
                    controls[f"person_{number}_weight"] = control(weight)
                controls[f"person_{number}_region"] = UploadedImage(
                    label=f"Person {number}'s region",
                    type="filepath",
                    height=140,
                    elem_id=f"person-{number}-region",
                    visible=masks,
                )
        brushes = ["#{:02x}{:02x}{:02x}".format(*colour) for colour in PALETTE]
        controls["region_drawing"] = RegionPainting(
            value=on.canvas_background(None, *(settings[side].default for side in ("width", "height"))),
            label="Or paint where each stands: red 1, green 2, blue 3, yellow 4",
            **PAINT_OVER,
            brush=gr.Brush(colors=brushes, default_color=brushes[0], color_mode="fixed"),
            height=360,
            elem_id="region-drawing",
            visible=masks,
        )


def lora_panel(controls: dict, choices: list):
    """The LoRA rows and the speed presets this server can offer; returns the speed buttons (by
    LoRA name) and the refresh button."""
    offered = {value for _, value in choices}
    with gr.Accordion("LoRA: styles, subjects, 8-step speed", open=False, elem_id="loras"):
        gr.Markdown(
            "LoRA files in `models/loras/` are listed here. A speed preset puts an 8-step LoRA in "
            "the first row and sets its steps and guidance. Speed LoRAs that this server has, or can "
            "download, are offered."
        )
        with gr.Row():
            speed_buttons = {
                name: gr.Button(f"{name}: {lora.steps} steps", size="sm")
                for name, lora in SPEED_LORAS.items()
                if name in offered
            }
        for row in range(1, LORA_ROWS + 1):
            with gr.Row(equal_height=True):
                controls[f"lora_{row}"] = ListedChoice(
                    choices, value="", label=f"LoRA {row}", scale=3, elem_id=f"lora-{row}"
                )
                controls[f"lora_{row}_strength"] = control(LORA_STRENGTH, scale=2)
        refresh = gr.Button("Refresh the list", size="sm")
    return speed_buttons, refresh
