"""The package's import graph, read from the source (module-level and in-function imports alike, nothing executed):
no import circle, no module importing a layer above its own, and the two registries (towers, checkpoint formats)
known only where they should be."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "medclip"

# Lowest first: a module may import its own layer and the layers below it, never one above.
LAYERS = {
    "flag_parsing": 0,  # the scripts' flag parser: imports nothing of medclip
    "quiet_imports": 0,  # the scripts' TensorFlow start-up filter: likewise
    "storage": 0,  # local paths and bucket URLs (etils epath): imports nothing of medclip
    "models": 0,
    "checkpoints": 1,
    "hybrid_clip": 2,
    PACKAGE: 2,  # medclip/__init__.py: re-exports FlaxHybridCLIP
    "configuration_hybrid_clip": 2,  # the flax-community module paths, kept for old code: re-exports
    "modeling_hybrid_clip": 2,
    "data": 3,
    "evaluation": 4,
    "training": 5,
    "inference": 6,
    "app": 7,
    "cli": 8,
}
# Narrower than the layers: the data pipeline needs the model's image normalisation, nothing else of the models.
ONLY = {("data", "models"): {"medclip.models", "medclip.models.preprocess"}}
TOWERS = ("bert", "clip_text", "clip_vision", "modified_resnet", "siglip_text", "siglip_vision", "timm_convnext",
          "timm_efficientnet", "timm_resnet", "timm_vit")
FORMATS = ("big_vision", "hf_layout", "openclip", "pmc_clip")


def modules(root: Path = ROOT) -> dict[str, Path]:
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package's modules it imports (`from a import b` counts as a.b when b is a module)."""
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                # a package's own __init__ runs before its modules anyway: not an edge
                if target and target != name and not name.startswith(target + "."):
                    found.add(target)
        edges[name] = found
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for source, targets in edges.items():
        for target in targets:
            a, b = layer_of(source), layer_of(target)
            if a not in LAYERS or b not in LAYERS:
                continue  # test_every_module_has_a_layer names it
            if LAYERS[b] > LAYERS[a]:
                bad.append(f"{source} ({a}) imports {target} ({b}), a layer above")
            elif (a, b) in ONLY and target not in ONLY[(a, b)]:
                bad.append(f"{source} imports {target}: {a} may import only {sorted(ONLY[(a, b)])} of {b}")
    return sorted(bad)


@pytest.fixture(scope="module")
def edges() -> dict[str, set[str]]:
    return imports(modules())


def test_every_module_has_a_layer(edges):
    """A new top-level module or package must be placed in LAYERS (that placement is the design decision)."""
    assert sorted({layer_of(m) for m in edges} - set(LAYERS)) == []


def test_no_import_circle(edges):
    assert circles(edges) == []


def test_no_module_imports_a_layer_above_its_own(edges):
    assert violations(edges) == []


def test_the_tower_registry_and_contract_import_no_tower(edges):
    """Each tower registers itself; the registry below the towers names none (the package imports them)."""
    for bottom in ("registry", "tower_contract", "timm_options", "config_base"):
        named = {t.rpartition(".")[2] for t in edges[f"medclip.models.{bottom}"]}
        assert not named & set(TOWERS), bottom
    assert {f"medclip.models.{t}" for t in TOWERS} <= edges["medclip.models"]


def test_only_the_dispatcher_knows_every_checkpoint_format(edges):
    formats = {f"medclip.checkpoints.{f}" for f in FORMATS}
    for fmt in formats:
        assert not edges[fmt] & formats, f"{fmt} imports another format"
    knowing_all = {m for m, targets in edges.items() if formats <= targets}
    assert knowing_all == {"medclip.checkpoints.formats"}


def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, set[str]]:
    for rel, text in files.items():
        path = tmp_path / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return imports(modules(tmp_path))


def test_a_circle_and_an_upward_import_are_found(tmp_path):
    """The checks above can fail: a two-module circle through an in-function import, and models importing
    training, are both reported."""
    edges = _tree(tmp_path, {
        "__init__.py": "",
        "models/__init__.py": "",
        "models/a.py": "def f():\n    from medclip.models import b\n",
        "models/b.py": "from medclip.models.a import f\n",
        "models/c.py": "from medclip.training import t\n",
        "training/__init__.py": "",
        "training/t.py": "from . import u\n",
        "training/u.py": "import medclip.data.d\n",
        "data/__init__.py": "",
        "data/d.py": "from medclip.models.a import f\n",
    })
    assert circles(edges) == [["medclip.models.a", "medclip.models.b"]]
    assert edges["medclip.training.t"] == {"medclip.training.u"}
    assert violations(edges) == [
        "medclip.data.d imports medclip.models.a: data may import only "
        "['medclip.models', 'medclip.models.preprocess'] of models",
        "medclip.models.c (models) imports medclip.training.t (training), a layer above",
    ]
