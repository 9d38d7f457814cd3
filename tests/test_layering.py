"""The three layers import one way: model <- engine <- server. Checked in fresh interpreters."""

from __future__ import annotations

import subprocess
import sys

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
