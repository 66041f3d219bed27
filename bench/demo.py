"""Write one proof-task image that holds exactly one circle (for the README's main job).

    python -m ib_edge.bench.demo out/demo.png --seed 7
prints the question to ask and the answer a correct model gives.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from . import proof_task


def demo_image(path: Path, seed: int = 7) -> tuple[str, str]:
    rng = np.random.default_rng([0x64656D6F, seed])  # "demo": its own stream
    while True:
        img, scene = proof_task.render_scene(rng)
        circles = [o for o in scene.objects if o.shape == "circle"]
        if len(circles) == 1:
            break
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return "What color is the circle?", circles[0].color


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    q, a = demo_image(args.out, args.seed)
    print(f"wrote {args.out}: ask {q!r}; the right answer is {a!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
