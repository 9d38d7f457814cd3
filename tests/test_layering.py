"""The layers import one way: model <- engine <- server, with cpu/ beside the model (it may
import the model, never the reverse). Checked in fresh interpreters, and statically for every
module of model/, cpu/ and engine/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SERVER_LIBS = ("starlette", "uvicorn", "msgpack", "websockets", "prometheus_client")


def _modules_after(imports: str) -> set[str]:
    code = f"import sys\n{imports}\nprint('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return set(done.stdout.split())


@pytest.mark.parametrize(
    ("imports", "forbidden"),
    [
        (
            "import dsm_stt.model.checkpoint, dsm_stt.model.mimi, dsm_stt.model.lm, "
            "dsm_stt.model.synthetic",
            ("dsm_stt.engine", "dsm_stt.server", *SERVER_LIBS),
        ),
        (
            "import dsm_stt.engine.engine, dsm_stt.engine.scheduler, dsm_stt.transcriber",
            ("dsm_stt.server", *SERVER_LIBS),
        ),
        ("import dsm_stt.engine.scheduler, dsm_stt.engine.words", ("torch",)),
    ],
)
def test_lower_layers_do_not_import_upper_ones(imports: str, forbidden: tuple[str, ...]) -> None:
    loaded = _modules_after(imports)
    bad = sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden))
    assert not bad, f"{imports!r} imported {bad}"


PACKAGE = Path(__file__).resolve().parent.parent / "dsm_stt"

# what each package's modules may not import, anywhere in the module (lazy imports included):
# the model is the reference math and knows no kernels; the CPU speed code plugs in beside
# it and knows no engine or server; the engine knows no server
RULES = {
    "model": (
        "dsm_stt.cpu",
        "dsm_stt.engine",
        "dsm_stt.server",
        "dsm_stt.config",
        "dsm_stt.loading",
        *SERVER_LIBS,
    ),
    "cpu": ("dsm_stt.engine", "dsm_stt.server", "dsm_stt.loading", *SERVER_LIBS),
    "engine": ("dsm_stt.server", "dsm_stt.loading", *SERVER_LIBS),
}


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved)."""
    package = "dsm_stt." + ".".join(path.relative_to(PACKAGE).parent.parts)
    package = package.rstrip(".")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.add(name)
            found |= {f"{name}.{alias.name}" for alias in node.names}
    return found


@pytest.mark.parametrize(
    "path",
    [p for layer in RULES for p in sorted((PACKAGE / layer).rglob("*.py"))],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_every_module_imports_only_downwards(path: Path) -> None:
    layer = path.relative_to(PACKAGE).parts[0]
    forbidden = RULES[layer]
    bad = sorted(
        m for m in _imports(path) if any(m == f or m.startswith(f + ".") for f in forbidden)
    )
    assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


def test_the_model_alone_loads_no_kernels() -> None:
    loaded = _modules_after("import dsm_stt.model.lm, dsm_stt.model.mimi, dsm_stt.model.checkpoint")
    assert not any(m.startswith("dsm_stt.cpu") for m in loaded)
    assert "torch.utils.cpp_extension" not in loaded


def test_relative_imports_are_resolved() -> None:
    found = _imports(PACKAGE / "cpu" / "quantize.py")
    assert {"dsm_stt.model.lm", "dsm_stt.cpu.features", "torch"} <= found
    assert "dsm_stt.config" in _imports(PACKAGE / "engine" / "engine.py")
