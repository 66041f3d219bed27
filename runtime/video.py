"""Video input for video bundles: frames (paths, bytes, PIL images or arrays) or a video file.

A video bundle (manifest ``model.kind == "video"``) takes exactly ``model.frames`` frames (4: the
number transformers' ``InstructBlipVideoProcessor`` hard-codes). Each frame is preprocessed as an
image (``preprocess.pixel_values``: the BLIP resize and normalisation per frame). A video file is
an animated GIF/PNG/WebP (Pillow) or anything PyAV decodes (mp4, webm, ...; the optional
``video`` extra); its frames are sampled evenly as LAVIS does (``sample_indices``). Every failure
is an InputError (one line).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import InputError
from .preprocess import _check_pixels, load_image

PYAV_HINT = "pip install 'ib-edge[video]' (PyAV) to read mp4/webm, or pass the frames (--frame F1 --frame F2 ...)"


def sample_indices(total: int, n: int) -> list[int]:
    """LAVIS's uniform sampling (``load_video``: ``np.arange(start, end, vlen / n_frms).astype(int)``,
    also what transformers' InstructBlipVideo docs do): n evenly spaced frame indices from 0."""
    return [int(i) for i in np.arange(0, total, total / n).astype(int)][:n]


def load_frames(video, frames: int) -> list:
    """``video`` -> ``frames`` RGB PIL images. ``video``: a list/tuple of frames (each as
    ``load_image`` takes an image), or one video file (path or encoded bytes)."""
    if isinstance(video, (list, tuple)):
        if len(video) != frames:
            raise InputError(f"got {len(video)} frame{'s' * (len(video) != 1)}; this video bundle takes {frames}",
                             hint=f"pass exactly {frames} frames, or one video file")
        return [load_image(f) for f in video]
    if isinstance(video, (str, os.PathLike)):
        path = Path(os.fspath(video))
        if not path.exists():
            raise InputError(f"video not found: {path}")
        if not path.is_file():
            raise InputError(f"video path is not a file: {path}")
        return _decode_file(path, str(path), frames)
    if isinstance(video, (bytes, bytearray, memoryview)):
        import io

        return _decode_file(io.BytesIO(bytes(video)), "video bytes", frames)
    raise InputError(f"video must be a list of {frames} frames or a video file (path or bytes), "
                     f"not {type(video).__name__}")


def _decode_file(source, what: str, frames: int) -> list:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(source)
    except UnidentifiedImageError:
        img = None  # not a format Pillow knows: mp4, webm, ... (or garbage)
    except Image.DecompressionBombError as e:
        raise InputError(f"video frames too large: {what}: {e}") from None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read video {what}: {e}") from None
    if img is not None:
        return _pillow_frames(img, what, frames)
    if hasattr(source, "seek"):
        source.seek(0)
    return _pyav_frames(source, what, frames)


def _pillow_frames(img, what: str, frames: int) -> list:
    """An animated GIF/PNG/WebP through Pillow; a still image is not a video."""
    from PIL import Image

    total = int(getattr(img, "n_frames", 1))
    if total < 2:
        raise InputError(f"{what} is a still image, not a video; this video bundle takes {frames} frames",
                         hint="pass the frames (--frame F1 --frame F2 ...) or a GIF/mp4/webm")
    if total < frames:
        raise InputError(f"{what} has {total} frames; this video bundle takes {frames}")
    _check_pixels(*img.size, what)
    out = []
    try:
        for i in sample_indices(total, frames):
            img.seek(i)
            img.load()
            out.append(img.convert("RGB"))
    except (OSError, EOFError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot decode video {what}: {e}") from None
    return out


def _pyav_frames(source, what: str, frames: int) -> list:
    """mp4/webm/... through PyAV: one pass counts the decoded frames, a second converts the
    sampled ones (a container's own frame count is absent or approximate for webm)."""
    try:
        import av
    except ImportError:
        raise InputError(f"{what} is not an image or GIF, and PyAV is not installed to decode it as a video",
                         hint=PYAV_HINT) from None

    def decoded():
        if hasattr(source, "seek"):
            source.seek(0)
        with av.open(source) as container:
            if not container.streams.video:
                raise InputError(f"{what} has no video stream")
            stream = container.streams.video[0]
            _check_pixels(stream.codec_context.width or 0, stream.codec_context.height or 0, what)
            yield from container.decode(stream)

    try:
        total = sum(1 for _ in decoded())
        if total < frames:
            raise InputError(f"{what} has {total} decodable frame{'s' * (total != 1)}; this video bundle "
                             f"takes {frames}" + (" (not a video file?)" if total == 0 else ""))
        want = sample_indices(total, frames)
        out = []
        for i, frame in enumerate(decoded()):
            if i in want:
                out.append(frame.to_image().convert("RGB"))
            if len(out) == len(want):
                break
    except InputError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError) as e:
        raise InputError(f"cannot decode video {what}: not an image, GIF or video PyAV can read ({e})") from None
    if len(out) != frames:
        raise InputError(f"cannot decode video {what}: frames changed between reads")
    return out
