"""The package's layering: no import cycles among dadpo's modules (function-level imports included), and a
command line that answers `--help` without importing torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """dadpo module → the dadpo modules it imports anywhere in its body. Importing `dadpo.a.b` also runs
    `dadpo.a` (its package's __init__), so that counts as an import of both."""
    mods = {".".join(p.relative_to(src).with_suffix("").parts).removesuffix(".__init__"): p
            for p in (src / "dadpo").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("dadpo"):
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                            for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("dadpo")}
        deps = set()
        for t in targets:
            parts = t.split(".")
            deps |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}  # the module and its packages
        graph[name] = {d for d in deps if d in mods and d != name and not name.startswith(d + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while comp[-1:] != [v]:
                comp.append(stack.pop())
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_in_dadpo():
    graph = import_graph()
    assert len(graph) > 40 and "dadpo.models" in graph["dadpo.prune.api"]
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle(tmp_path):
    pkg = tmp_path / "dadpo"
    (pkg / "stage").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "stage" / "__init__.py").write_text("from dadpo.stage.api import run\n")
    (pkg / "stage" / "api.py").write_text("def run():\n    from dadpo.models import load\n")
    (pkg / "models.py").write_text("def load():\n    import dadpo.stage.classes\n")  # runs stage/__init__
    (pkg / "stage" / "classes.py").write_text("")
    assert cycles(import_graph(tmp_path)) == [["dadpo.models", "dadpo.stage", "dadpo.stage.api"]]


def test_help_imports_no_torch():
    code = ("import sys\nfrom dadpo.cli import build_parser\nbuild_parser().format_help()\n"
            "heavy = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]\nprint(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def environment_writes(src: Path = SRC) -> list[str]:
    """`module:line` of every write to `os.environ` in dadpo (item assignment, deletion, pop, update,
    setdefault): settings such as the data folder travel as arguments, never through the process."""
    found = []
    for path in (src / "dadpo").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Assign | ast.Delete):
                targets = node.targets
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                    "pop", "update", "setdefault", "clear", "__setitem__"):
                targets = [node.func.value]
            for t in targets:
                t = t.value if isinstance(t, ast.Subscript) else t
                if isinstance(t, ast.Attribute) and t.attr == "environ":
                    found.append(f"{path.relative_to(src)}:{node.lineno}")
    return found


def test_settings_never_travel_through_the_environment(tmp_path):
    """Only the command line's start sets TOKENIZERS_PARALLELISM (for the tokenizers library, not dadpo);
    a recipe's data_dir reaches the stages as an argument."""
    assert environment_writes() == ["dadpo/cli.py:" + str(next(
        i for i, line in enumerate((SRC / "dadpo" / "cli.py").read_text().splitlines(), 1)
        if "TOKENIZERS_PARALLELISM" in line))]
    (tmp_path / "dadpo").mkdir()
    (tmp_path / "dadpo" / "m.py").write_text('import os\nos.environ["DADPO_DATA_DIR"] = "x"\n')
    assert environment_writes(tmp_path) == ["dadpo/m.py:2"]
