"""The package's shape holds: no import cycle between its modules (module-level imports); the
math packages import neither vLLM nor FastAPI (vLLM's boundary is also ruff's TID251) nor
argparse (command lines live in ``vllm_lora_ext/cli/``); vLLM is imported only in
``vllm_lora_ext/vllm_boundary/`` and the punica wrappers, and nothing imports back into the
boundary."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("vllm_lora_ext", "lora_kernels")
MATH = (
    "vllm_lora_ext/merge",
    "vllm_lora_ext/migrate",
    "vllm_lora_ext/evaluation",
    "vllm_lora_ext/training.py",
    "vllm_lora_ext/cpu_lora/segment_ops.py",
    "lora_kernels",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports(path: Path) -> set[str]:
    """Absolute imports at module level, ``if TYPE_CHECKING:`` blocks included (lazy imports
    inside functions are deliberate: heavy or optional dependencies)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    top = [*tree.body, *(n for s in tree.body if isinstance(s, ast.If) for n in s.body)]
    for node in top:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {m: {i for i in module_imports(p) if i in files and i != m} for m, p in files.items()}


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                cycles.append([*stack[stack.index(n) :], n])
            elif n not in state:
                visit(n, [*stack, n])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    return cycles


def test_no_import_cycles() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert find_cycles(graph()) == []


def benchmark_graph() -> dict[str, set[str]]:
    """The benchmark scripts import each other as top-level modules (``benchmarks/`` on
    ``sys.path``); every import counts, lazy ones inside functions too."""
    files = {p.stem: p for p in (ROOT / "benchmarks").glob("*.py")}
    return {m: {i for i in every_import(p) if i in files and i != m} for m, p in files.items()}


def test_no_import_cycles_among_the_benchmarks() -> None:
    edges = benchmark_graph()
    assert {"gpu_check", "kernel_tune", "vllm_lora_ops"} <= set(edges)
    assert find_cycles(edges) == []
    # The kernel fixtures live in the test kit (lora_kernels/testing.py), not in gpu_check:
    # the scripts it runs import nothing of it.
    assert not [m for m, deps in edges.items() if "gpu_check" in deps]


def test_math_code_imports_no_vllm_no_fastapi_no_argparse() -> None:
    bad = []
    for prefix in MATH:
        where = ROOT / prefix
        for path in where.rglob("*.py") if where.is_dir() else [where]:
            for name in module_imports(path):
                if name.split(".")[0] in ("vllm", "fastapi", "starlette", "argparse"):
                    bad.append(f"{path.relative_to(ROOT)}: {name}")
    assert not bad, bad


BOUNDARY = "vllm_lora_ext/vllm_boundary"
PUNICA_WRAPPERS = (
    "vllm_lora_ext/cpu_lora/punica_wrapper.py",
    "vllm_lora_ext/gpu_lora/punica_wrapper.py",
    "vllm_lora_ext/gpu_lora/interpreted.py",
)
NAMES_THE_BOUNDARY = ("vllm_lora_ext/cli/serve.py",)
"""Starts vLLM with our entry points and worker extension, by name: above the boundary."""


def every_import(path: Path) -> set[str]:
    """Absolute imports anywhere in the file, lazy ones inside functions included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_vllm_is_imported_only_in_the_boundary_and_the_punica_wrappers() -> None:
    """ruff's TID251 says the same for module-level and lazy imports; this also fails when
    someone widens ruff's per-file exceptions."""
    bad = []
    for path in sorted((ROOT / "vllm_lora_ext").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel.startswith(BOUNDARY + "/") or rel in PUNICA_WRAPPERS:
            continue
        bad += [f"{rel}: {n}" for n in every_import(path) if n.split(".")[0] == "vllm"]
    assert not bad, bad


def test_nothing_below_the_boundary_imports_back_into_it() -> None:
    bad = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel.startswith(BOUNDARY + "/") or rel in NAMES_THE_BOUNDARY:
                continue
            names = every_import(path)
            bad += [f"{rel}: {n}" for n in names if n.startswith("vllm_lora_ext.vllm_boundary")]
    assert not bad, bad
