"""Where llama3-dist keeps what it builds once per machine (the embedded default model, the CPU
kernel library): $LLAMA3_DIST_CACHE, else $XDG_CACHE_HOME/llama3-dist, else ~/.cache/llama3-dist."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("LLAMA3_DIST_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama3-dist"
