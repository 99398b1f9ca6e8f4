"""The code's shape (docs/DESIGN.md): no function in pipeline/ or cacr/ longer than ~80 lines,
unless its docstring says it is a "hot kernel" (and why splitting it would cost speed). Long
functions are where concerns pile up; this keeps the loop-in-small-functions shape from eroding."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 80


def long_functions(path: Path, max_lines: int = MAX_LINES) -> list[str]:
    """``file:line name (N lines)`` of every function (methods and nested ones included) longer
    than ``max_lines``, counted from ``def`` to its last line, whose docstring does not say
    "hot kernel"."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        lines = node.end_lineno - node.lineno + 1
        if lines > max_lines and "hot kernel" not in (ast.get_docstring(node) or "").lower():
            out.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_no_function_over_80_lines_in_pipeline_or_cacr():
    offenders = []
    for package in ("pipeline", "cacr"):
        for path in sorted((REPO / package).rglob("*.py")):
            offenders += [f"{path.relative_to(REPO).parent}/{hit}" for hit in long_functions(path)]
    assert offenders == [], ("functions over ~80 lines (split them into named steps, or document a "
                             "hot kernel as such in its docstring):\n" + "\n".join(offenders))


def test_the_length_check_sees_what_it_forbids(tmp_path):
    # the guard must catch a long function (else the test above passes vacuously), nested and
    # method ones too, and accept one documented as a hot kernel
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    probe = tmp_path / "probe.py"
    probe.write_text(f"def long():\n{body}\n\n"
                     f"class K:\n    def method(self):\n    {body.replace(chr(10), chr(10) + '    ')}\n\n"
                     f'def kernel():\n    """The hot kernel of X: one call per chunk."""\n{body}\n\n'
                     "def short():\n    return 1\n")
    assert [h.split(" ")[1] for h in long_functions(probe)] == ["long", "method"]


def ray_inits(path: Path) -> list[str]:
    """``file:line`` of every ``ray.init(...)`` call (or ``init`` imported from ray) in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                and n.module == "ray" for a in n.names if a.name == "init"}
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if (isinstance(f, ast.Attribute) and f.attr == "init" and isinstance(f.value, ast.Name)
                and f.value.id == "ray") or (isinstance(f, ast.Name) and f.id in imported):
            out.append(node.lineno)
    return [f"{path.name}:{line}" for line in sorted(out)]


def test_ray_is_started_only_by_ray_start():
    """Commands, benchmarks and the test fixture start or join Ray one way,
    pipeline.ray_start.start_ray (RAY_ADDRESS or a NEW local instance, never a bare ray.init that
    joins whatever `ray start` left on the machine)."""
    offenders = []
    for package in ("pipeline", "bench", "cacr"):
        for path in sorted((REPO / package).rglob("*.py")):
            if path != REPO / "pipeline" / "ray_start.py":
                offenders += [f"{package}/{hit}" for hit in ray_inits(path)]
    offenders += [f"tests/{hit}" for hit in ray_inits(REPO / "tests" / "conftest.py")]
    assert offenders == [], "ray.init outside pipeline/ray_start.py:\n" + "\n".join(offenders)


def test_the_ray_init_check_sees_what_it_forbids(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import ray\nfrom ray import init as start\nray.init()\n"
                     "if not ray.is_initialized():\n    ray.init(num_cpus=2)\nstart(address='auto')\n"
                     "obj.init()\n")
    assert ray_inits(probe) == ["probe.py:3", "probe.py:5", "probe.py:6"]


def test_code_cites_documents_inside_the_repository():
    """The method specification and design live in docs/; code and tests cite them there, never
    at a path outside the repository (which a reader of the repository cannot open)."""
    import re

    cite = re.compile(r"(\S*?)\b(METHOD|DESIGN|LONGTAIL)\.md")
    bad = []
    for package in ("pipeline", "cacr", "bench", "tests"):
        for path in sorted((REPO / package).rglob("*.py")):
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                for m in cite.finditer(line):
                    where = m.group(1).strip("`'\"(")
                    if where not in ("", "docs/") or not (REPO / "docs" / f"{m.group(2)}.md").is_file():
                        bad.append(f"{path.relative_to(REPO)}:{lineno}: {m.group(0)}")
    assert bad == [], "documents cited outside docs/:\n" + "\n".join(bad)
