"""Calls to the running app's /generate endpoint, with every parameter filled (small and fast)."""

from pathlib import Path

from pulid.serve import components

REPO = Path(__file__).resolve().parent.parent


PHOTO = REPO / "example_inputs" / "astronaut.png"


def settings(**kw):
    """Values for every /generate parameter, in the endpoint's order (small and fast by default)."""
    from pulid.request import generation_settings

    small = dict(id_image=None, extra_images=[], width=256, height=256, num_steps=2, seed="5")
    small["max_sequence_length"] = 128
    small.update(
        {name: "" if name.endswith(("1", "2", "3")) else 1.0 for name in components.lora_input_names()}
    )
    for name in components.people_input_names():  # nobody else: no photos, no region, weight 1
        small[name] = 1.0 if name.endswith("_weight") else [] if name[-1].isdigit() else None
    small["mask_drawing"] = small["region_drawing"] = None
    values = {}
    for name in components.input_names():
        declared = {s.name: s.default for s in generation_settings()}
        values[name] = kw.get(name, small.get(name, declared.get(name)))
    unknown = set(kw) - set(values)
    assert not unknown, unknown
    return values


class Reply:
    """The outputs of /generate: results gallery, summary text, files, details, debug gallery."""

    def __init__(self, outputs):
        self.gallery, self.info, self.files, self.details, self.debug = outputs

    @property
    def seed(self) -> int:
        return self.details[0]["seed"]

    @property
    def seeds(self) -> list[int]:
        return [d["seed"] for d in self.details]

    @property
    def image(self) -> str:
        """The first image's file, as saved (with its metadata)."""
        return self.files[0]


def call(client, **kw) -> Reply:
    from gradio_client import handle_file

    values = settings(**kw)
    if values["id_image"] is not None:
        values["id_image"] = handle_file(str(values["id_image"]))
    values["extra_images"] = [handle_file(str(p)) for p in values["extra_images"]]
    for name in ("mask_drawing", "region_drawing"):  # a painted layer, as the page's editor sends it
        if values[name] is not None:
            layer = handle_file(str(values[name]))
            values[name] = {"background": None, "layers": [layer], "composite": None, "id": None}
    for name in ("init_image", "mask", "id_region", *components.people_input_names()):
        if name.endswith("_weight") or values[name] is None:
            continue
        if isinstance(values[name], list):
            values[name] = [handle_file(str(p)) for p in values[name]]
        else:
            values[name] = handle_file(str(values[name]))
    return Reply(client.predict(**values, api_name="/generate"))
