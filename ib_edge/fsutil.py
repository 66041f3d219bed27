"""Directory swaps shared by everything that writes a directory atomically (bundles, Triton
model repositories): build in a temporary sibling, then swap it into place."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_dir(tmp: Path, out: Path, old: Path) -> None:
    """Swap ``tmp`` into ``out``; an existing ``out`` is moved to ``old`` first (back again if
    the swap fails) and removed after."""
    moved = False
    if out.exists():
        os.replace(out, old)
        moved = True
    try:
        os.replace(tmp, out)
    except BaseException:
        if moved:
            os.replace(old, out)
        raise
    if moved:
        shutil.rmtree(old, ignore_errors=True)
