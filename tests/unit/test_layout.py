"""The package's shape holds: no import cycle between its modules (module-level imports); the
math packages import neither vLLM nor FastAPI (vLLM's boundary is also ruff's TID251) nor
argparse (command lines live in ``vllm_lora_ext/cli/``)."""

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


def test_math_code_imports_no_vllm_no_fastapi_no_argparse() -> None:
    bad = []
    for prefix in MATH:
        where = ROOT / prefix
        for path in where.rglob("*.py") if where.is_dir() else [where]:
            for name in module_imports(path):
                if name.split(".")[0] in ("vllm", "fastapi", "starlette", "argparse"):
                    bad.append(f"{path.relative_to(ROOT)}: {name}")
    assert not bad, bad
