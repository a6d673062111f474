"""The driver-side core is plain Python and numpy: importing it (and the package, the config and
the sampling params) loads no torch, so a driver process and its scheduler stay light."""

from __future__ import annotations

import subprocess
import sys

CORE = [
    "llama3_dist",
    "llama3_dist.config",
    "llama3_dist.sampling_params",
    "llama3_dist.outputs",
    "llama3_dist.core.text_context",
    "llama3_dist.core.block_manager",
    "llama3_dist.core.scheduler",
    "llama3_dist.core.step_input",
    "llama3_dist.core.sampling_metadata",
    "llama3_dist.core.detokenizer",
]


def test_core_loads_no_torch():
    code = (
        f"import importlib, sys\nfor name in {CORE!r}:\n    importlib.import_module(name)\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'transformers', 'fastapi') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "import llama3_dist\nassert 'torch' not in sys.modules and 'LLM' in dir(llama3_dist)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_public_names_resolve_lazily():
    import llama3_dist

    for name in llama3_dist.__all__:
        assert getattr(llama3_dist, name).__name__ == name
