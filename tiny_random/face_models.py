"""Stand-ins for the face models PuLID uses, in the real file formats, small and built on demand.

Nothing here is a trained model. Each file has the exact signature or key layout the real
loaders expect, so the REAL insightface, onnxruntime and facexlib code loads and runs them:

``scrfd_10g_bnkps.onnx`` (insightface SCRFD detector)
    Input ``input.1`` of shape (1, 3, height, width); nine outputs, scores / box distances /
    keypoint distances for strides 8, 16 and 32 with two anchors per cell, which is how
    ``insightface.model_zoo`` recognises an SCRFD model with keypoints. The graph does not look
    for faces: it is told where they are, as fractions of the *content box* (the bounding box of
    the pixels that are not pure black, so that insightface's black letterbox and black padding
    do not move them). For each configured face it gives a 0.9 score to the stride-8 anchor
    nearest the face centre, and box and keypoint distances that decode to the configured face.
    It reports nothing when the image has no contrast (standard deviation of the content's luminance
    below ``min_contrast``, e.g. a blank image), when the face would be smaller than ``min_face_px`` or
    larger than ``max_face_px`` pixels of the detector input (the way a real detector misses
    tiny faces and faces that fill the frame), or when the detector input is larger than
    ``max_det_size``.

``glintr100.onnx`` (insightface ArcFace recogniser)
    Input (N, 3, 112, 112) to output (N, 512): a 7x7 average pool followed by a fixed random
    projection (``arcface_reference`` recomputes it in numpy). Its first nodes are not named
    Sub/Mul, so insightface normalises with mean 127.5 / std 127.5, as for the real glintr100.

``detection_Resnet50_Final.pth`` (facexlib RetinaFace-ResNet50), with ``module.`` key prefixes
    as in the released file. The weights are set by hand: every bottleneck's residual branch is
    switched off (``bn3`` scale 0) and the stem computes the absolute Laplacian of the luminance,
    which the rest of the network carries through and blurs. So the face score at stride 32 rises
    with the local texture of the image: a uniform image gives no detection; a photo gives boxes
    of ``box_scale`` x 256 pixels wherever it is textured enough, thinned by facexlib's NMS (most
    textured first) to a loose lattice, each with five landmarks at typical positions inside its
    box. Only stride 32, first anchor, can fire. It finds no *face*: the code under test must
    pick the right box, which is what the alignment rule is for.

``parsing_bisenet.pth`` and ``parsing_parsenet.pth`` (facexlib parsers)
    The real classes with seeded random weights. ``parsing_parsenet.pth`` is only there because
    ``FaceRestoreHelper`` loads it even when BiSeNet is used.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

# ----------------------------------------------------------------------------------------------
# Faces to report


@dataclass(frozen=True)
class FaceSpec:
    """A face as fractions of the content box: box (x1, y1, x2, y2) and five (x, y) keypoints."""

    box: tuple[float, float, float, float]
    kps: tuple[tuple[float, float], ...]

    def box_in(self, width: int, height: int) -> np.ndarray:
        """The box in pixels of an image of that size (content box = whole image)."""
        x1, y1, x2, y2 = self.box
        return np.array([x1 * width, y1 * height, x2 * width, y2 * height], dtype=np.float32)

    def kps_in(self, width: int, height: int) -> np.ndarray:
        return np.array([(x * width, y * height) for x, y in self.kps], dtype=np.float32)

    def scaled(self, factor: float, centre: tuple[float, float] | None = None) -> FaceSpec:
        """The same face shrunk or grown about its centre (or ``centre``) by ``factor``."""
        x1, y1, x2, y2 = self.box
        cx, cy = centre if centre is not None else ((x1 + x2) / 2, (y1 + y2) / 2)

        def move(x: float, y: float) -> tuple[float, float]:
            return cx + (x - cx) * factor, cy + (y - cy) * factor

        (nx1, ny1), (nx2, ny2) = move(x1, y1), move(x2, y2)
        return FaceSpec((nx1, ny1, nx2, ny2), tuple(move(x, y) for x, y in self.kps))

    def shifted(self, dx: float, dy: float) -> FaceSpec:
        x1, y1, x2, y2 = self.box
        return FaceSpec((x1 + dx, y1 + dy, x2 + dx, y2 + dy), tuple((x + dx, y + dy) for x, y in self.kps))


# The face of skimage.data.astronaut() (512 x 512), measured by eye: box from the eyebrows' top to
# the chin, keypoints at the eye centres, nose tip and mouth corners (pixels / 512).
ASTRONAUT_FACE = FaceSpec(
    box=(178 / 512, 68 / 512, 270 / 512, 172 / 512),
    kps=(
        (204 / 512, 101 / 512),
        (246 / 512, 102 / 512),
        (226 / 512, 126 / 512),
        (205 / 512, 141 / 512),
        (244 / 512, 141 / 512),
    ),
)


# ----------------------------------------------------------------------------------------------
# A tiny ONNX graph builder


@dataclass
class _Graph:
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    count: int = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value, dtype=np.float32, hint: str = "c") -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(
        self, op_type: str, *inputs: str, out: str | None = None, node_name: str | None = None, **attrs
    ) -> str:
        out = out or self.name(op_type.lower())
        self.nodes.append(
            helper.make_node(
                op_type, list(inputs), [out], name=node_name or self.name(f"n_{op_type.lower()}"), **attrs
            )
        )
        return out


def _save(graph: _Graph, name: str, inputs, outputs, path: Path) -> Path:
    model = helper.make_model(
        helper.make_graph(graph.nodes, name, inputs, outputs, initializer=graph.inits),
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="pulid-tests",
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


# ----------------------------------------------------------------------------------------------
# SCRFD detector


def build_scrfd(
    path: Path,
    faces: Sequence[FaceSpec] = (ASTRONAUT_FACE,),
    *,
    min_face_px: float = 16.0,
    max_face_px: float = 1e6,
    max_det_size: int | None = None,
    min_contrast: float = 25.0,
) -> Path:
    """Write an SCRFD-signature ONNX detector that reports ``faces`` (see the module docstring)."""
    g = _Graph()
    enabled = [1.0] * len(faces)
    if not faces:  # keep one face slot so that no tensor has a zero-size axis; it never fires
        faces, enabled = [ASTRONAUT_FACE], [0.0]
    box = np.array([f.box for f in faces], dtype=np.float32)  # (F, 4)
    kps = np.array([f.kps for f in faces], dtype=np.float32)  # (F, 5, 2)
    big = 1e9

    x = "input.1"
    v = g.op("Add", g.op("Mul", x, g.const(128.0)), g.const(127.5))  # back to 0..255 (RGB)
    vmax = g.op("ReduceMax", v, axes=[1], keepdims=0)  # (1, H, W)
    content = g.op("Greater", vmax, g.const(0.5))
    rows = g.op("ReduceMax", g.op("Cast", content, to=TensorProto.FLOAT), axes=[2], keepdims=0)  # (1, H)
    cols = g.op("ReduceMax", g.op("Cast", content, to=TensorProto.FLOAT), axes=[1], keepdims=0)  # (1, W)

    shape = g.op("Shape", x)
    height = g.op("Gather", shape, g.const(2, np.int64), axis=0)
    width = g.op("Gather", shape, g.const(3, np.int64), axis=0)
    one_i = g.const(1, np.int64)
    zero_i = g.const(0, np.int64)
    ys = g.op("Cast", g.op("Range", zero_i, height, one_i), to=TensorProto.FLOAT)
    xs = g.op("Cast", g.op("Range", zero_i, width, one_i), to=TensorProto.FLOAT)

    def extent(mask: str, idx: str) -> tuple[str, str]:
        on = g.op("Greater", mask, g.const(0.5))
        lo = g.op("ReduceMin", g.op("Where", on, idx, g.const(big)), keepdims=0)
        hi = g.op("ReduceMax", g.op("Where", on, g.op("Add", idx, g.const(1.0)), g.const(-big)), keepdims=0)
        return lo, hi

    y0, y1 = extent(rows, ys)
    x0, x1 = extent(cols, xs)
    cw = g.op("Sub", x1, x0)
    ch = g.op("Sub", y1, y0)

    # Contrast = standard deviation of the content's luminance: robust to the few mid-grey pixels
    # that resizing leaves where the content meets a black border.
    lum = g.op("ReduceMean", v, axes=[1], keepdims=0)
    weight = g.op("Cast", content, to=TensorProto.FLOAT)
    count = g.op("Add", g.op("ReduceSum", weight, keepdims=0), g.const(1.0))
    mean = g.op("Div", g.op("ReduceSum", g.op("Mul", lum, weight), keepdims=0), count)
    centred = g.op("Mul", g.op("Sub", lum, mean), weight)
    std = g.op("Sqrt", g.op("Div", g.op("ReduceSum", g.op("Mul", centred, centred), keepdims=0), count))
    contrast_ok = g.op("Cast", g.op("Greater", std, g.const(min_contrast)), to=TensorProto.FLOAT)
    gate = g.op("Mul", contrast_ok, g.const(np.array(enabled, np.float32)))
    if max_det_size is not None:
        too_big = g.op("Greater", g.op("Cast", height, to=TensorProto.FLOAT), g.const(float(max_det_size)))
        gate = g.op("Mul", gate, g.op("Cast", g.op("Not", too_big), to=TensorProto.FLOAT))

    def to_px_x(frac) -> str:
        return g.op("Add", x0, g.op("Mul", g.const(frac), cw))

    def to_px_y(frac) -> str:
        return g.op("Add", y0, g.op("Mul", g.const(frac), ch))

    bx1, bx2 = to_px_x(box[:, 0]), to_px_x(box[:, 2])  # (F,)
    by1, by2 = to_px_y(box[:, 1]), to_px_y(box[:, 3])
    bw = g.op("Sub", bx2, bx1)
    size_ok = g.op(
        "And",
        g.op("GreaterOrEqual", bw, g.const(min_face_px)),
        g.op("LessOrEqual", bw, g.const(max_face_px)),
    )
    gate = g.op("Mul", gate, g.op("Cast", size_ok, to=TensorProto.FLOAT))  # (F,)
    kx = to_px_x(kps[:, :, 0])  # (F, 5)
    ky = to_px_y(kps[:, :, 1])
    half = g.const(0.5)
    cx = g.op("Mul", g.op("Add", bx1, bx2), half)
    cy = g.op("Mul", g.op("Add", by1, by2), half)

    outputs: dict[str, list[str]] = {"score": [], "bbox": [], "kps": []}
    for stride in (8, 16, 32):
        hs = g.op("Div", height, g.const(stride, np.int64))
        ws = g.op("Div", width, g.const(stride, np.int64))
        if stride != 8:  # only stride 8 reports faces; the other levels are all zeros
            n = g.op("Mul", g.op("Mul", hs, ws), g.const(2, np.int64))
            for key, k in (("score", 1), ("bbox", 4), ("kps", 10)):
                dims = g.op(
                    "Concat", g.op("Unsqueeze", n, g.const([0], np.int64)), g.const([k], np.int64), axis=0
                )
                outputs[key].append(
                    g.op("ConstantOfShape", dims, value=numpy_helper.from_array(np.zeros(1, np.float32)))
                )
            continue
        s = g.const(float(stride))
        gy = g.op("Mul", g.op("Cast", g.op("Range", zero_i, hs, one_i), to=TensorProto.FLOAT), s)
        gx = g.op("Mul", g.op("Cast", g.op("Range", zero_i, ws, one_i), to=TensorProto.FLOAT), s)
        ay = g.op("Reshape", gy, g.const([-1, 1, 1], np.int64))  # (hs, 1, 1)
        ax = g.op("Reshape", gx, g.const([1, -1, 1], np.int64))  # (1, ws, 1)

        def nearest(c: str, _s: str = s) -> str:  # anchor coordinate nearest to c
            return g.op("Mul", g.op("Floor", g.op("Add", g.op("Div", c, _s), half)), _s)

        own = g.op(
            "Mul",
            g.op(
                "Cast",
                g.op("And", g.op("Equal", ax, nearest(cx)), g.op("Equal", ay, nearest(cy))),
                to=TensorProto.FLOAT,
            ),
            gate,
        )  # (hs, ws, F)
        axes2 = g.const([2], np.int64)
        score = g.op("ReduceSum", g.op("Mul", own, g.const(0.9)), axes2, keepdims=0)  # (hs, ws)

        parts = [g.op("Sub", ax, bx1), g.op("Sub", ay, by1), g.op("Sub", bx2, ax), g.op("Sub", by2, ay)]
        zero = g.op("Mul", own, g.const(0.0))  # (hs, ws, F), to broadcast every part to full shape
        parts = [g.op("Unsqueeze", g.op("Add", p, zero), g.const([-1], np.int64)) for p in parts]
        dist = g.op("Concat", *parts, axis=-1)  # (hs, ws, F, 4)
        own4 = g.op("Unsqueeze", own, g.const([-1], np.int64))
        bbox = g.op("Div", g.op("ReduceSum", g.op("Mul", dist, own4), axes2, keepdims=0), s)  # (hs, ws, 4)

        ax4 = g.op("Unsqueeze", ax, g.const([-1], np.int64))  # (1, ws, 1, 1)
        ay4 = g.op("Unsqueeze", ay, g.const([-1], np.int64))
        zero4 = g.op("Unsqueeze", zero, g.const([-1], np.int64))  # (hs, ws, F, 1)
        dx = g.op("Unsqueeze", g.op("Add", g.op("Sub", kx, ax4), zero4), g.const([-1], np.int64))
        dy = g.op("Unsqueeze", g.op("Add", g.op("Sub", ky, ay4), zero4), g.const([-1], np.int64))
        kd = g.op(
            "Reshape", g.op("Concat", dx, dy, axis=-1), g.const([0, 0, 0, 10], np.int64)
        )  # (hs,ws,F,10)
        kpsd = g.op("Div", g.op("ReduceSum", g.op("Mul", kd, own4), axes2, keepdims=0), s)  # (hs, ws, 10)

        for key, t, k in (("score", score, 1), ("bbox", bbox, 4), ("kps", kpsd, 10)):
            if k == 1:
                t = g.op("Unsqueeze", t, g.const([-1], np.int64))
            t = g.op("Unsqueeze", t, g.const([2], np.int64))  # (hs, ws, 1, k)
            both = g.op("Concat", t, g.op("Mul", t, g.const(0.0)), axis=2)  # second anchor: nothing
            outputs[key].append(g.op("Reshape", both, g.const([-1, k], np.int64)))

    graph_outputs = []
    for key, k in (("score", 1), ("bbox", 4), ("kps", 10)):
        for stride, name in zip((8, 16, 32), outputs[key], strict=True):
            out = f"{key}_{stride}"
            g.op("Identity", name, out=out)
            graph_outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [f"n{stride}", k]))
    graph_input = helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 3, "height", "width"])
    return _save(g, "scrfd_fixture", [graph_input], graph_outputs, Path(path))


# ----------------------------------------------------------------------------------------------
# ArcFace recogniser


def arcface_projection(seed: int = 0) -> np.ndarray:
    """The fixed (768, 512) projection of the ArcFace fixture."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((768, 512)) / math.sqrt(768)).astype(np.float32)


def build_arcface(path: Path, seed: int = 0) -> Path:
    """Write a (N, 3, 112, 112) -> (N, 512) ONNX model that insightface routes to ArcFaceONNX."""
    g = _Graph()
    pooled = g.op("AveragePool", "input.1", kernel_shape=[7, 7], strides=[7, 7], node_name="pool")
    flat = g.op("Flatten", pooled, axis=1, node_name="flatten")
    g.op("MatMul", flat, g.const(arcface_projection(seed)), out="embedding", node_name="projection")
    graph_input = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])
    graph_output = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["None", 512])
    return _save(g, "arcface_fixture", [graph_input], [graph_output], Path(path))


def arcface_reference(aligned_bgr_112: np.ndarray, seed: int = 0) -> np.ndarray:
    """What the ArcFace fixture returns for one aligned 112x112 BGR crop, computed in numpy."""
    rgb = aligned_bgr_112[:, :, ::-1].astype(np.float32)
    x = (rgb - 127.5) / 127.5
    pooled = x.reshape(16, 7, 16, 7, 3).mean(axis=(1, 3))  # (16, 16, 3)
    flat = pooled.transpose(2, 0, 1).reshape(-1)  # channel-major, like Flatten of NCHW
    return flat @ arcface_projection(seed)


# ----------------------------------------------------------------------------------------------
# facexlib RetinaFace, BiSeNet, ParseNet

# Landmarks inside a detected box, as fractions of the box size from its centre.
RETINA_LANDMARKS = ((-0.2, -0.1), (0.2, -0.1), (0.0, 0.07), (-0.15, 0.25), (0.15, 0.25))
RETINA_PRIOR = 256.0  # stride-32 first-anchor prior size in facexlib's RetinaFace config
TEXTURE_GAIN = 1.0  # face logit per unit of blurred |Laplacian| (0..255 scale); fires above ~3.5


def build_retinaface(path: Path, *, box_scale: float = 0.75, gain: float = TEXTURE_GAIN) -> Path:
    """Write a facexlib ``detection_Resnet50_Final.pth`` whose face score follows image texture."""
    from facexlib.detection.retinaface import RetinaFace

    with warnings.catch_warnings():  # facexlib builds its ResNet-50 with torchvision's old `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        net = RetinaFace(network_name="resnet50", half=False, device="cpu")
    sd = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    for k in sd:
        if k.endswith("running_var") or (k.endswith(".weight") and sd[k].ndim == 1):
            sd[k].fill_(1.0)  # every BatchNorm is the identity ...
        if ".bn3.weight" in k:
            sd[k].zero_()  # ... except the last one of each bottleneck: no residual branch

    lap = torch.zeros(7, 7)
    lap[2:5, 2:5] = -1.0 / 8
    lap[3, 3] = 1.0
    sd["body.conv1.weight"][0] = lap / 3  # +Laplacian of the mean of B, G, R
    sd["body.conv1.weight"][1] = -lap / 3  # -Laplacian; both through ReLU: |Laplacian|
    sd["body.layer1.0.downsample.0.weight"][0, :2] = 1.0
    for layer in (2, 3, 4):
        sd[f"body.layer{layer}.0.downsample.0.weight"][0, 0] = 1.0
    box = torch.full((3, 3), 1.0 / 9)
    for i in (1, 2, 3):
        sd[f"fpn.output{i}.0.weight"][0, 0] = 1.0
    for i in (1, 2):
        sd[f"fpn.merge{i}.0.weight"][0, 0] = box
    for i in (1, 2, 3):
        for conv in ("conv3X3", "conv5X5_1", "conv5X5_2", "conv7X7_2", "conv7x7_3"):
            sd[f"ssh{i}.{conv}.0.weight"][0, 0] = box

    for level in range(3):
        bias = sd[f"ClassHead.{level}.conv1x1.bias"]
        bias[1] = bias[3] = -100.0  # face logits: never, except below
    sd["ClassHead.2.conv1x1.bias"][1] = 0.0  # stride 32, first anchor: fires with texture
    sd["ClassHead.2.conv1x1.weight"][1, 192] = gain  # the 7x7-blurred texture channel
    loc = math.log(box_scale) / 0.2
    sd["BboxHead.2.conv1x1.bias"][:4] = torch.tensor([0.0, 0.0, loc, loc])
    side = box_scale * RETINA_PRIOR
    for i, (fx, fy) in enumerate(RETINA_LANDMARKS):
        sd["LandmarkHead.2.conv1x1.bias"][2 * i] = fx * side / (0.1 * RETINA_PRIOR)
        sd["LandmarkHead.2.conv1x1.bias"][2 * i + 1] = fy * side / (0.1 * RETINA_PRIOR)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    return path


def build_bisenet(path: Path, seed: int = 0) -> Path:
    """Write a facexlib ``parsing_bisenet.pth`` (19 classes) with seeded random weights."""
    from facexlib.parsing.bisenet import BiSeNet

    torch.manual_seed(seed)
    net = BiSeNet(num_class=19)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def build_parsenet(path: Path, seed: int = 0) -> Path:
    """Write a facexlib ``parsing_parsenet.pth`` with seeded random weights (loaded, never used)."""
    from facexlib.parsing.parsenet import ParseNet

    torch.manual_seed(seed)
    net = ParseNet(in_size=512, out_size=512, parsing_ch=19)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def build_facexlib_models(folder: Path) -> Path:
    """Write the three facexlib files into ``folder`` (facexlib's ``model_rootpath``)."""
    folder = Path(folder)
    build_retinaface(folder / "detection_Resnet50_Final.pth")
    build_bisenet(folder / "parsing_bisenet.pth")
    build_parsenet(folder / "parsing_parsenet.pth")
    return folder


def build_antelopev2(folder: Path, faces: Sequence[FaceSpec] = (ASTRONAUT_FACE,), **scrfd_options) -> Path:
    """Write ``scrfd_10g_bnkps.onnx`` and ``glintr100.onnx`` into ``folder``."""
    folder = Path(folder)
    build_scrfd(folder / "scrfd_10g_bnkps.onnx", faces, **scrfd_options)
    build_arcface(folder / "glintr100.onnx")
    return folder
