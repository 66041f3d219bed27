"""Where ib-edge keeps its per-user files (torch-free, imported by the runtime's leaves)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """``$IB_EDGE_HOME``, default ``~/.cache/ib-edge``: the default bundle, the LLM kernel cache,
    ORT's TensorRT engine cache, the Triton environment."""
    return Path(os.environ.get("IB_EDGE_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "ib-edge"))
