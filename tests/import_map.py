"""The repository's import map, read from the source (lazy imports included), and its rules.

A module's imports are every ``import`` and ``from ... import`` at any level of its code, resolved
to the repository's own modules (``from pulid import stages`` is ``pulid.stages``). The layers run
one way: the front ends, then ``pulid.serve``, then the fixtures of the tiny preset
(``tiny_random``), then the library ``pulid``, then ``eva_clip``, then ``flux``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGES = ("flux", "eva_clip", "pulid", "tiny_random")
FRONT_ENDS = ("app_flux", "generate")
# Lowest first: a module may import its own layer and those before it, never one after it.
LAYERS = ("flux", "eva_clip", "pulid", "tiny_random", "pulid.serve", "front end")
SERVING_LIBRARIES = ("gradio", "gradio_client", "starlette", "fastapi", "uvicorn", "ray", "spaces")
# The identity half of the library: photos to ID embeddings. It never imports generation.
IDENTITY = ("pulid.face_analysis", "pulid.face_detection", "pulid.face_alignment", "pulid.id_encoder")
GENERATION = ("pulid.pipeline", "pulid.loading", "pulid.request", "pulid.injection", "pulid.regions")


def module_files(root: Path) -> dict[str, Path]:
    """Every module of the repository's packages and front ends, by dotted name."""
    modules = {name: root / f"{name}.py" for name in FRONT_ENDS if (root / f"{name}.py").is_file()}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imports_of(path: Path, module: str, known: set[str]) -> tuple[set[str], set[str]]:
    """(the repository's modules ``module`` at ``path`` imports, the other top-level packages it
    imports). Importing ``a.b.c`` runs the packages ``a`` and ``a.b`` first: those count too,
    except the packages ``module`` itself belongs to (already running when it is imported)."""
    ours, others = set(), set()
    own = {module.rsplit(".", depth)[0] for depth in range(1, module.count(".") + 1)}

    def add(name: str) -> None:
        if name.split(".")[0] in (*PACKAGES, *FRONT_ENDS):
            while name not in known and "." in name:  # an object imported from a module
                name = name.rsplit(".", 1)[0]
            while name in known and name not in own:
                ours.add(name)
                if "." not in name:
                    break
                name = name.rsplit(".", 1)[0]
        else:
            others.add(name.split(".")[0])

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            add(node.module)
            for alias in node.names:  # ``from pulid import stages``: the submodule
                if f"{node.module}.{alias.name}" in known:
                    add(f"{node.module}.{alias.name}")
    return ours, others


def import_map(root: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> the repository's modules it imports, module -> other packages it imports)."""
    files = module_files(root)
    known = set(files)
    ours, others = {}, {}
    for name, path in files.items():
        ours[name], others[name] = imports_of(path, name, known)
        ours[name].discard(name)
    return ours, others


def layer(module: str) -> int:
    if module in FRONT_ENDS:
        return LAYERS.index("front end")
    if module == "pulid.serve" or module.startswith("pulid.serve."):
        return LAYERS.index("pulid.serve")
    return LAYERS.index(module.split(".")[0])


def startup_preset(module: str, imported: str) -> bool:
    """The one import the rule allows past the fixtures: start-up builds the ``tiny-random`` preset."""
    return module == "pulid.serve.startup" and imported in ("tiny_random", "tiny_random.pipeline")


def rule_breaks(root: Path) -> list[str]:
    """Every import that breaks the layering, in words; empty when the map keeps the rules."""
    ours, others = import_map(root)
    breaks = []
    for module, imported in sorted(ours.items()):
        for target in sorted(imported):
            if layer(target) > layer(module):
                breaks.append(f"{module} imports {target}, a layer above it")
            elif target.startswith("tiny_random") and not module.startswith("tiny_random"):
                if not startup_preset(module, target):
                    breaks.append(f"{module} imports the fixtures ({target})")
            elif module in IDENTITY and target in GENERATION:
                breaks.append(f"{module} (identity) imports {target} (generation)")
        if layer(module) < LAYERS.index("pulid.serve"):
            for package in sorted(others[module] & set(SERVING_LIBRARIES)):
                breaks.append(f"{module} imports {package}, a serving library")
    return breaks


def cycles(root: Path) -> list[list[str]]:
    """The import map's circles (strongly connected components of more than one module)."""
    ours, _ = import_map(root)
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(ours.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(ours):
        if node not in index:
            visit(node)
    return found
