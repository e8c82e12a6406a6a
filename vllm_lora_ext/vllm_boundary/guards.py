"""What this package expects of vLLM's sources, as data, and the one check of it.

Each :class:`Expect` names one vLLM symbol our code patches, subclasses or calls, and what it
relies on: the positional parameters, async or not, a property, the ``self.<name>`` attributes
it assigns, a class's fields, or a source fragment. The check reads vLLM's *source* (``ast``),
never imports it: at start-up the installed files (:func:`installed_source`), and in
``tests/unit/test_vllm_next.py`` the Python files inside a released wheel, so one table answers
"does this vLLM still have what we patch?" for both. :func:`require` fails loudly, naming every
mismatch; vLLM runs general plugins unguarded, so the process does not start.

Nothing here imports vLLM.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Expect:
    module: str
    """Dotted vLLM module, e.g. ``vllm.lora.model_manager``."""
    symbol: str
    """Dotted name inside it (``Class``, ``Class.method``, ``function``, an imported or assigned
    module-level name); empty: the module as a whole (only ``contains`` applies)."""
    why: str
    """Which code of ours relies on it: the first line of the error when it is gone."""
    params: tuple[str, ...] | None = None
    """Positional parameter names, exactly, in order (``self``/``cls`` included): what a patch
    or an override passes on."""
    accepts: tuple[str, ...] | None = None
    """Positional parameter names we call it with, in order; any further one has a default."""
    keywords: tuple[str, ...] = ()
    """Further parameter names that must exist, of any kind."""
    is_async: bool | None = None
    is_property: bool = False
    assigns: tuple[str, ...] = ()
    """``self.<name>`` assigned in the function (in any method, for a class)."""
    fields: tuple[str, ...] = ()
    """Class-level annotated names (dataclass, pydantic or msgspec fields), in this order."""
    contains: tuple[str, ...] = ()
    """Source fragments, compared with all whitespace runs as one space."""

    @property
    def where(self) -> str:
        return f"{self.module}.{self.symbol}" if self.symbol else self.module


class VllmIncompatible(RuntimeError):
    """The installed vLLM lacks something this package patches or calls."""


def installed_source(module: str) -> str | None:
    """The source of an installed module, without importing it (its parent packages are)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    with open(spec.origin, encoding="utf-8") as f:
        return f.read()


def check(
    expects: Iterable[Expect], source_of: Callable[[str], str | None] = installed_source
) -> list[str]:
    """Every mismatch, one line each (``where: what``); empty when all hold."""
    trees: dict[str, tuple[str, ast.Module] | None] = {}
    found: list[str] = []
    for expect in expects:
        if expect.module not in trees:
            source = source_of(expect.module)
            trees[expect.module] = None if source is None else (source, ast.parse(source))
        parsed = trees[expect.module]
        if parsed is None:
            found.append(f"{expect.where}: module {expect.module} not found ({expect.why})")
            continue
        found += [f"{expect.where}: {p} ({expect.why})" for p in problems(expect, *parsed)]
    return found


def require(expects: Iterable[Expect], version: str) -> None:
    """Raise :class:`VllmIncompatible` listing every mismatch with the installed vLLM."""
    found = check(expects)
    if found:
        lines = "\n  ".join(found)
        raise VllmIncompatible(
            f"vllm-lora-ext cannot run on vLLM {version}: what it patches or calls has "
            f"changed (vllm_lora_ext/vllm_boundary/guards.py):\n  {lines}"
        )


def problems(expect: Expect, source: str, tree: ast.Module) -> list[str]:
    node: ast.AST | None = tree if not expect.symbol else _find(tree, expect.symbol.split("."))
    if node is None:
        return ["not defined"]
    found: list[str] = []
    if expect.params is not None or expect.accepts is not None or expect.keywords:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            return [f"not a function ({type(node).__name__})"]
        args = node.args
        positional = tuple(a.arg for a in (*args.posonlyargs, *args.args))
        if expect.params is not None and positional != expect.params:
            found.append(f"positional parameters {positional}, expected {expect.params}")
        if expect.accepts is not None:
            n, required = len(expect.accepts), len(positional) - len(args.defaults)
            if positional[:n] != expect.accepts or required > n:
                found.append(
                    f"positional parameters {positional} ({len(args.defaults)} with defaults), "
                    f"called as {expect.accepts}"
                )
        every = {a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)}
        missing = [k for k in expect.keywords if k not in every]
        if missing:
            found.append(f"no parameter {', '.join(missing)}")
    if expect.is_async is not None and expect.is_async != isinstance(node, ast.AsyncFunctionDef):
        found.append("is not async" if expect.is_async else "is async")
    if expect.is_property and not _is_property(node):
        found.append("is not a property")
    if expect.assigns:
        assigned = _self_assignments(node)
        missing = [a for a in expect.assigns if a not in assigned]
        if missing:
            found.append(f"assigns no self.{', self.'.join(missing)}")
    if expect.fields:
        fields = _class_fields(node)
        present = [f for f in fields if f in expect.fields]
        if present != list(expect.fields):
            found.append(f"fields {fields[: len(expect.fields) + 3]}, expected {expect.fields}")
    if expect.contains:
        text = _normalised(
            source if isinstance(node, ast.Module) else ast.get_source_segment(source, node) or ""
        )
        for fragment in expect.contains:
            if _normalised(fragment) not in text:
                found.append(f"no longer contains {fragment!r}")
    return found


def _find(scope: ast.AST, path: list[str]) -> ast.AST | None:
    head, rest = path[0], path[1:]
    for node in getattr(scope, "body", []):
        if _defines(node, head):
            return node if not rest else _find(node, rest)
    return None


def _defines(node: ast.AST, name: str) -> bool:
    if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
        return node.name == name
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
    if isinstance(node, ast.AnnAssign):
        return isinstance(node.target, ast.Name) and node.target.id == name
    if isinstance(node, ast.ImportFrom | ast.Import):
        return any((a.asname or a.name.split(".")[0]) == name for a in node.names)
    return False


def _is_property(node: ast.AST) -> bool:
    decorators = getattr(node, "decorator_list", [])
    return any(isinstance(d, ast.Name) and d.id in ("property", "cached_property")
               for d in decorators)  # fmt: skip


def _self_assignments(node: ast.AST) -> set[str]:
    names: set[str] = set()
    for sub in ast.walk(node):
        targets = (
            sub.targets
            if isinstance(sub, ast.Assign)
            else [sub.target]
            if isinstance(sub, ast.AnnAssign | ast.AugAssign)
            else []
        )
        for t in targets:
            for el in t.elts if isinstance(t, ast.Tuple) else [t]:
                if (
                    isinstance(el, ast.Attribute)
                    and isinstance(el.value, ast.Name)
                    and el.value.id == "self"
                ):
                    names.add(el.attr)
    return names


def _class_fields(node: ast.AST) -> list[str]:
    return [
        s.target.id
        for s in getattr(node, "body", [])
        if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
    ]


def _normalised(text: str) -> str:
    return " ".join(text.split())
