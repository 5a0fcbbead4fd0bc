"""The package's shape: no import cycles between its modules (counting imports inside
functions too, the usual way to hide one), and the checkpoint layout read in one place."""
import ast
import os

import spoco_vol

ROOT = os.path.dirname(spoco_vol.__file__)


def _modules() -> dict:
    """spoco_vol module name -> its source file."""
    out = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
                name = "spoco_vol" if rel == "__init__" else "spoco_vol." + rel.removesuffix(".__init__")
                out[name] = os.path.join(d, f)
    return out


def _imports(name: str, path: str, modules) -> set:
    """The spoco_vol modules ``name`` imports, anywhere in the file."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            target = (base + "." + node.module if node.module else base) if node.level else node.module
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}  # `from . import io` imports a module
    # a module imports its package too, but that edge is the package's __init__, not a cycle of ours
    return {m for m in found if m in modules and m != name and not name.startswith(m + ".")}


def _cycle(graph: dict) -> list | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None
    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles():
    modules = _modules()
    # the package's __init__ re-exports the API: importing it from a submodule is not a cycle
    graph = {m: _imports(m, p, modules) - {"spoco_vol"} for m, p in modules.items()}
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_checkpoint_module_reads_checkpoint_keys():
    """The keys of the stored layout appear as subscripts only in spoco_vol/checkpoint.py."""
    keys = {"architecture", "state_dict", "normalization", "inference", "foreground", "training_state",
            "delta_v", "delta_d", "voxel_size", "training"}
    offenders = []
    for name, path in _modules().items():
        if name == "spoco_vol.checkpoint":
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value in keys:
                base = ast.unparse(node.value)
                if "ckpt" in base or "checkpoint" in base or base in ("ck", "model", "best", "st"):
                    offenders.append(f"{name}: {ast.unparse(node)}")
    assert not offenders, offenders
