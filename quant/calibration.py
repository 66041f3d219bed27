"""Calibration sets: images + instructions, hashed, and the feeds made from them.

The default set (``calib_data/``) holds CC0/public-domain photos from scikit-image's bundled
samples plus proof-task images, and a list of varied instructions; ``index.json`` lists every
file with its sha256, source and licence, and the set's hash goes into the manifest.
Rebuild it with ``python -m ib_edge.quant.calibration --rebuild-default``.

A user set is any directory of images (``--calib DIR``), optionally with ``instructions.txt``
(one instruction per line). Calibrating on the deployment domain is the recommended path.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path

from ib_edge.runtime.errors import IbEdgeError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
INDEX = "index.json"
INSTRUCTIONS = "instructions.txt"

# scikit-image's bundled samples (loaded offline), split once: calibration vs held-out.
# Licences as scikit-image documents them (skimage.data docstrings).
CALIB_PHOTOS = {
    "astronaut": "public domain (NASA)", "coffee": "CC0 (Rachel Michetti)",
    "hubble_deep_field": "public domain (NASA)", "immunohistochemistry": "no known copyright restrictions",
    "retina": "CC0 1.0 (Häggström, 2014)", "camera": "CC0 (Lav Varshney)", "brick": "CC0 (CC0Textures)",
    "coins": "no known copyright restrictions", "grass": "CC0 (CC0Textures)", "gravel": "CC0 (CC0Textures)",
    "horse": "CC0 (Andreas Preuss)", "moon": "no known copyright restrictions",
    "cell": "CC0", "text": "public domain",
}
# Never used for calibration: drift is measured on these.
HELDOUT_PHOTOS = ("chelsea", "rocket", "clock", "page", "microaneurysms", "logo")
PROOF_IMAGES = 16
PROOF_STREAM = 0x63616C69  # "cali": disjoint from the proof task's train and eval streams

DEFAULT_INSTRUCTIONS = """\
Describe this image.
Write a short caption for this picture.
Describe the image in detail.
What is the main object in this photo?
What color is the circle?
What shape is the blue object?
How many shapes are there?
How many people are in the picture?
Is the square on the left or the right?
What is unusual about this image?
Where was this photo taken?
What is the person doing?
Count the objects in the image.
Is there any text in the image? What does it say?
What time of day is it in this photo?
Why might someone take this picture?
What would happen next in this scene?
Answer briefly: is this indoors or outdoors?
Question: what material is shown? Answer:
List the colors you can see.
"""


class CalibrationError(IbEdgeError):
    pass


def default_dir() -> Path:
    from ib_edge import calib_data

    return Path(calib_data.__file__).resolve().parent


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclasses.dataclass(frozen=True)
class CalibrationSet:
    root: Path
    images: tuple[Path, ...]
    instructions: tuple[str, ...]
    sha256: str          # over every image's and the instructions' bytes, in order

    @classmethod
    def load(cls, directory: str | Path | None = None) -> "CalibrationSet":
        root = Path(directory).expanduser() if directory else default_dir()
        if not root.is_dir():
            raise CalibrationError(f"calibration directory not found: {root}")
        images = tuple(sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        if len(images) < 2:
            raise CalibrationError(f"calibration directory {root} has {len(images)} images; need at least 2",
                                   hint="add images of your deployment domain (JPEG/PNG)")
        inst_file = root / INSTRUCTIONS
        text = inst_file.read_text(encoding="utf-8") if inst_file.is_file() else DEFAULT_INSTRUCTIONS
        instructions = tuple(ln.strip() for ln in text.splitlines() if ln.strip())
        if not instructions:
            raise CalibrationError(f"{inst_file} has no instructions")
        h = hashlib.sha256()
        for p in images:
            h.update(str(p.relative_to(root)).encode() + b"\0" + bytes.fromhex(_sha(p)))
        h.update("\n".join(instructions).encode())
        return cls(root, images, instructions, h.hexdigest())

    def split(self, heldout_every: int = 4) -> tuple[list[Path], list[Path]]:
        """(calibration images, held-out images): every ``heldout_every``-th image (by sorted
        name) is held out for drift measurement and never calibrated on."""
        calib = [p for i, p in enumerate(self.images) if i % heldout_every != heldout_every - 1]
        held = [p for i, p in enumerate(self.images) if i % heldout_every == heldout_every - 1]
        return calib, held

    def record(self) -> dict:
        calib, held = self.split()
        return {"sha256": self.sha256, "source": "default" if self.root == default_dir() else str(self.root),
                "images": len(self.images), "calibration_images": len(calib), "heldout_images": len(held),
                "instructions": len(self.instructions)}


def build_default_set(out: Path, max_side: int = 320) -> Path:
    """Write the default calibration set: photos (JPEG, longest side ``max_side``), proof-task
    images, instructions and index.json with per-file sha256, source and licence."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from ib_edge.bench import proof_task

    out = Path(out)
    (out / "photos").mkdir(parents=True, exist_ok=True)
    (out / "proof").mkdir(parents=True, exist_ok=True)
    entries = []
    for name, licence in sorted(CALIB_PHOTOS.items()):
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        path = out / "photos" / f"{name}.jpg"
        img.save(path, quality=90)
        entries.append({"file": f"photos/{name}.jpg", "source": f"scikit-image skimage.data.{name}()",
                        "licence": licence})
    for i in range(PROOF_IMAGES):
        img, _ = proof_task.render_scene(np.random.default_rng([PROOF_STREAM, i]))
        path = out / "proof" / f"proof_{i:02d}.png"
        img.save(path)
        entries.append({"file": f"proof/proof_{i:02d}.png", "source": f"ib_edge.bench.proof_task stream {PROOF_STREAM:#x} index {i}",
                        "licence": "generated by this project"})
    (out / INSTRUCTIONS).write_text(DEFAULT_INSTRUCTIONS, encoding="utf-8")
    entries.append({"file": INSTRUCTIONS, "source": "written for this project", "licence": "same as the project"})
    for e in entries:
        e["sha256"] = _sha(out / e["file"])
    cset = CalibrationSet.load(out)
    (out / INDEX).write_text(json.dumps({"set_sha256": cset.sha256, "files": entries}, indent=2) + "\n")
    return out


def verify_default_index(root: Path | None = None) -> list[str]:
    """Problems with the shipped set (files missing, changed or unlisted); empty when intact."""
    root = root or default_dir()
    index = json.loads((root / INDEX).read_text())
    problems = []
    listed = set()
    for e in index["files"]:
        listed.add(e["file"])
        p = root / e["file"]
        if not p.is_file():
            problems.append(f"missing: {e['file']}")
        elif _sha(p) != e["sha256"]:
            problems.append(f"changed: {e['file']}")
    for p in CalibrationSet.load(root).images:
        if str(p.relative_to(root)) not in listed:
            problems.append(f"unlisted: {p.relative_to(root)}")
    if CalibrationSet.load(root).sha256 != index["set_sha256"]:
        problems.append("set hash differs from index.json")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build or check the default calibration set.")
    ap.add_argument("--rebuild-default", action="store_true", help="rewrite calib_data/ from its sources")
    args = ap.parse_args(argv)
    if args.rebuild_default:
        print(build_default_set(default_dir()))
    problems = verify_default_index()
    print("\n".join(problems) or f"calibration set OK: {CalibrationSet.load().record()}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
