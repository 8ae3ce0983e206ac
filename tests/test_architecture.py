"""The one-way layering (DESIGN.md section 2, docs/ARCHITECTURE.md) as a contract: import-linter
checks the contracts in pyproject.toml (layers, the core's own order, the core's dependencies, no
import cycles), and no module imports lorakit inside a function (the way cycles used to be hidden)."""

import ast
from pathlib import Path

from importlinter.cli import lint_imports

import lorakit

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(lorakit.__file__).parent


def test_the_import_contracts_hold(capsys):
    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Contracts: 4 kept, 0 broken." in out


def _imports_inside_functions(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.level or (inner.module or "").startswith("lorakit")):
                    found.append(f"{path.relative_to(SRC)}:{inner.lineno} from {inner.module}")
                elif isinstance(inner, ast.Import) and any(a.name.startswith("lorakit") for a in inner.names):
                    found.append(f"{path.relative_to(SRC)}:{inner.lineno} import lorakit")
    return found


def test_no_module_imports_lorakit_inside_a_function():
    found = sorted({hit for path in SRC.rglob("*.py") for hit in _imports_inside_functions(path)})
    assert found == []
