"""The package's import rule (docs/DESIGN.md, Layout): data flows down, offline stages never
import serving, the runtime stays thin, and tokens meet a backend in one place."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qwen_deploy"
STAGES = {
    "checkpoint",
    "export",
    "quantize",
    "tensorrt",
    "runtime",
    "generation",
    "serving",
    "parity",
    "cli",
}
# what each stage must not import (at module level; `lazy` lists what a function may import)
FORBIDDEN = {
    "runtime": STAGES - {"runtime"},
    "generation": {"serving", "parity", "quantize", "export", "cli"},
    "quantize": {"serving", "cli", "tensorrt"},
    "parity": {"serving", "generation", "quantize", "cli"},
    "checkpoint": STAGES - {"checkpoint"},
    "export": STAGES - {"export", "checkpoint"},
    "tensorrt": STAGES - {"tensorrt", "runtime"},
    "serving": {"parity", "quantize", "export", "cli"},
}
LAZY_ONLY: dict[str, set[str]] = {}
THIN = ("runtime", "generation", "serving")  # never torch or transformers


def imports(path: Path) -> list[tuple[str, bool]]:
    """(absolute module, at module level) of every import in `path`."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.append((module, id(node) in top))
        elif isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
    return found


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "qwen_deploy" and len(parts) > 1 else None


def test_stages_import_only_downstream():
    problems = []
    for stage, forbidden in FORBIDDEN.items():
        for path in (PACKAGE / stage).rglob("*.py"):
            for module, module_level in imports(path):
                target = stage_of(module)
                lazy_ok = target in LAZY_ONLY.get(stage, set()) and not module_level
                if target in forbidden or (target in LAZY_ONLY.get(stage, set()) and not lazy_ok):
                    problems.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not problems, problems


def test_the_runtime_never_imports_torch_or_transformers():
    problems = [
        f"{path.relative_to(PACKAGE)} imports {module}"
        for stage in THIN
        for path in (PACKAGE / stage).rglob("*.py")
        for module, _ in imports(path)
        if module.split(".")[0] in ("torch", "transformers")
    ]
    assert not problems, problems


def test_one_place_runs_a_backend_step():
    """Every backend.forward call outside the backends themselves is runtime/decode.py's."""
    callers = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if re.search(r"\bbackend\.forward\(", path.read_text())
    )
    assert callers == ["runtime/decode.py"]


def test_contract_names_are_spelled_once():
    """past/present names, the data file and the Microsoft domain live in contract.py."""
    spelled = re.compile(r'"(past_key_values|present)\.|"model\.onnx\.data"|"com\.microsoft"')
    problems = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "contract.py" and spelled.search(path.read_text())
    ]
    assert not problems, problems
