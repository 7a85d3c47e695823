"""The shape of the code base: autoseg's packages import only their own layer and the layers below (``LAYERS``, bottom
to top), the library never imports the plugins (``planners``, ``trainers``), and no import cycles anywhere."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("autoseg", "planners", "trainers")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project's modules it imports anywhere in its file (functions included), leaving out imports
    under ``if TYPE_CHECKING:``, which never run."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        hidden = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for node in ast.walk(block)
        }
        targets = set()
        for node in ast.walk(tree):
            if id(node) in hidden:
                continue
            if isinstance(node, ast.Import):
                targets |= {resolve(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {resolve(f"{node.module}.{alias.name}") for alias in node.names}
        graph[name] = {target for target in targets if target and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_the_import_graph_finds_a_cycle_where_there_is_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = import_graph()
    assert {"autoseg.api.train", "trainers.base", "autoseg.api.predict", "autoseg.paths"} <= set(graph)
    assert "trainers" in graph["autoseg.commands.train"]  # the commands use the trainers, never the reverse
    assert cycles(graph) == []


#: The library's layers, bottom to top (documentation/overview.md, "The map"). A module may import modules of its own
#: layer and of the layers below, never above. A name stands for that module or package and everything inside it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("autoseg", "autoseg.errors", "autoseg.registry", "autoseg.machine", "autoseg.parallel", "autoseg.distributed"),
    ("autoseg.io",),
    ("autoseg.labels", "autoseg.plans", "autoseg.paths"),
    ("autoseg.data",),
    ("autoseg.preprocess",),
    ("autoseg.networks",),
    ("autoseg.infer",),
    ("autoseg.evaluate",),
    ("autoseg.train",),
    ("autoseg.plan",),
    ("autoseg.api",),
    ("autoseg.commands",),
)

#: The plugins: they may import the library up to this layer (``autoseg.plan``), never ``autoseg.api`` or
#: ``autoseg.commands``; of the library only ``autoseg.commands`` may import them.
PLUGINS = ("planners", "trainers")
PLUGINS_SEE_UP_TO = "autoseg.plan"


def _owner(module: str, names: tuple[str, ...]) -> str | None:
    """The longest of ``names`` that is ``module`` or a package holding it."""
    found = [name for name in names if module == name or module.startswith(name + ".")]
    return max(found, key=len, default=None)


def layer_of(module: str) -> int | None:
    """The index in ``LAYERS`` of a library module (0 at the bottom); None for a plugin."""
    owner = _owner(module, tuple(name for layer in LAYERS for name in layer))
    if owner is None:
        return None
    return next(index for index, layer in enumerate(LAYERS) if owner in layer)


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import in ``graph`` against the layer order, as ``importer -> imported (why)``."""
    plugins_limit = layer_of(PLUGINS_SEE_UP_TO)
    problems = []
    for module, targets in sorted(graph.items()):
        is_plugin = _owner(module, PLUGINS) is not None
        source_layer = layer_of(module)
        for target in sorted(targets):
            target_layer = layer_of(target)
            if target_layer is None:  # a plugin
                if not is_plugin and source_layer != layer_of("autoseg.commands"):
                    problems.append(f"{module} -> {target} (the library imports a plugin)")
            elif is_plugin and target_layer > plugins_limit:
                problems.append(f"{module} -> {target} (a plugin imports above {PLUGINS_SEE_UP_TO})")
            elif not is_plugin and target_layer > source_layer:
                problems.append(f"{module} -> {target} (layer {source_layer} imports layer {target_layer})")
    return problems


def test_every_module_belongs_to_a_layer_or_a_plugin() -> None:
    strays = [name for name in import_graph() if layer_of(name) is None and _owner(name, PLUGINS) is None]
    assert strays == []


def test_no_module_imports_against_the_layer_order() -> None:
    assert layer_violations(import_graph()) == []


def test_the_layer_check_finds_an_upward_import() -> None:
    graph = {
        "autoseg.io.images": {"autoseg.errors"},
        "autoseg.preprocess.preprocessing": {"autoseg.io.images", "autoseg.plan.fingerprint"},  # upward
        "autoseg.plan.fingerprint": {"autoseg.preprocess.preprocessing"},
        "autoseg.infer.predictor": {"trainers"},  # the library importing a plugin
        "trainers.base": {"autoseg.train.losses", "autoseg.api.predict"},  # a plugin importing the API
        "autoseg.commands.train": {"trainers", "autoseg.api.train"},
    }
    assert layer_violations(graph) == [
        "autoseg.infer.predictor -> trainers (the library imports a plugin)",
        "autoseg.preprocess.preprocessing -> autoseg.plan.fingerprint (layer 4 imports layer 9)",
        "trainers.base -> autoseg.api.predict (a plugin imports above autoseg.plan)",
    ]


def test_the_layer_check_finds_an_upward_import_in_a_real_file(tmp_path, monkeypatch) -> None:
    # A copy of the tree with one made-up upward import: io importing the training loop's API.
    import shutil

    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    images = tmp_path / "autoseg" / "io" / "images.py"
    images.write_text(
        images.read_text(encoding="utf-8") + "\n\ndef _upward():\n    from autoseg.api.train import train\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert layer_violations(import_graph()) == ["autoseg.io.images -> autoseg.api.train (layer 1 imports layer 10)"]
