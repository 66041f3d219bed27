"""Image and prompt preprocessing, exactly as ``InstructBlipProcessor`` does it, without torch.

Image: RGB (alpha composited on white), PIL resize to the model's size, rescale, normalise,
channels first. Prompt: the LLM tokenizer's ids with ``num_query_tokens`` ``<image>`` ids in
front (the processor's image-token expansion), and the Q-Former tokenizer's ids and mask.
Tokenizers are the bundle's ``tokenizer.json`` files run by the ``tokenizers`` library.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import BundleError, InputError

# Images above this many pixels are refused before decoding (a decompression bomb would
# otherwise allocate gigabytes). 64 MP covers any real camera frame.
MAX_IMAGE_PIXELS = 64_000_000
MAX_PROMPT_CHARS = 20_000


def load_image(image):
    """An image -> an RGB PIL image, as transformers' ``InstructBlipProcessor`` sees the same
    input. Every failure is an InputError.

    - a path (str / os.PathLike) or encoded bytes (JPEG, PNG, ... in memory): decoded here, then
      as transformers' ``load_image`` does for a path: EXIF orientation applied
      (``ImageOps.exif_transpose``) and ``convert("RGB")`` (alpha dropped, not composited);
    - a PIL image or a numpy array (HWC or HW, uint8): taken as decoded pixels, as the processor
      takes them: no EXIF transpose, alpha composited onto white.
    Images above MAX_IMAGE_PIXELS are refused in every form (before decoding, for encoded ones)."""
    from PIL import Image, ImageOps

    if isinstance(image, Image.Image):
        _check_pixels(*image.size, "image")
        img = image
    elif isinstance(image, np.ndarray):
        img = _from_array(image)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        import io

        img = _decode(lambda: io.BytesIO(bytes(image)), "image bytes")
        return _as_transformers_path(img, ImageOps)
    elif isinstance(image, (str, os.PathLike)):
        try:
            path = Path(os.fspath(image))
            exists, is_file = path.exists(), path.is_file()
        except (ValueError, OSError) as e:  # embedded NUL, name too long, ...
            raise InputError(f"bad image path {str(image)[:80]!r}: {e}") from None
        if not exists:
            raise InputError(f"image not found: {path}")
        if not is_file:
            raise InputError(f"image path is not a file: {path}")
        img = _decode(lambda: path, str(path))
        return _as_transformers_path(img, ImageOps)
    else:
        raise InputError(f"image must be a path, encoded bytes, a PIL image or a numpy array (HxWx3 uint8), "
                         f"not {type(image).__name__}")
    if img.width < 1 or img.height < 1:
        raise InputError("image is empty (0 pixels)")
    return to_rgb(img)


def _check_pixels(w: int, h: int, what: str) -> None:
    if w * h > MAX_IMAGE_PIXELS:
        raise InputError(f"image too large: {w}x{h} = {w * h / 1e6:.0f} MP (limit {MAX_IMAGE_PIXELS / 1e6:.0f} MP): "
                         f"{what}", hint="downscale it first")


def _decode(source, what: str):
    """Open + fully decode (so truncation shows here, not mid-pipeline); size checked first."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(source())
    except Image.DecompressionBombError as e:
        raise InputError(f"image too large: {what}: {e}", hint="downscale it first") from None
    except UnidentifiedImageError:
        raise InputError(f"not an image file (unrecognised format): {what}") from None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read image {what}: {e}") from None
    _check_pixels(*img.size, what)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot decode image {what}: {e}") from None
    if img.width < 1 or img.height < 1:
        raise InputError(f"image is empty (0 pixels): {what}")
    return img


def _as_transformers_path(img, ImageOps):
    """What transformers' ``load_image`` makes of a file: EXIF orientation applied, RGB."""
    try:
        img = ImageOps.exif_transpose(img)
        return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"cannot decode image: {e}") from None


def _from_array(a: np.ndarray):
    from PIL import Image

    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise InputError(f"a numpy image must be uint8 HxW, HxWx3 or HxWx4, got {a.dtype} {list(a.shape)}")
    _check_pixels(a.shape[1], a.shape[0], "numpy image")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise InputError("image is empty (0 pixels)")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(a))


def to_rgb(img):
    """RGB, any transparency composited onto white (transformers' ``convert_to_rgb``)."""
    from PIL import Image

    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def pixel_values(images, cfg: dict) -> np.ndarray:
    """RGB PIL images -> float32 [B,3,H,W], following the manifest's ``preprocess`` record."""
    from PIL import Image

    out = []
    h, w = cfg["size"]
    for img in images:
        if cfg.get("do_resize", True):
            img = img.resize((w, h), resample=Image.Resampling(cfg["resample"]))
        x = np.asarray(img).astype(np.float64)
        if cfg.get("do_rescale", True):
            x = x * cfg["rescale_factor"]
        x = x.astype(np.float32)
        if cfg.get("do_normalize", True):
            x = (x - np.asarray(cfg["image_mean"], np.float32)) / np.asarray(cfg["image_std"], np.float32)
        out.append(np.ascontiguousarray(x.transpose(2, 0, 1)))
    return np.stack(out).astype(np.float32)


class PromptEncoder:
    """Tokenizes a prompt for the LLM and for the Q-Former as the processor does."""

    def __init__(self, llm_tokenizer_path: Path, qformer_tokenizer_path: Path, model: dict):
        from tokenizers import Tokenizer

        def load(path, what):
            try:
                tok = Tokenizer.from_file(str(path))
            except Exception as e:  # tokenizers raises a bare Exception for a malformed file
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise BundleError(f"cannot load the {what} tokenizer {Path(path).name}: {first[:200]}",
                                  hint="re-export the bundle") from None
            tok.no_padding()
            tok.no_truncation()
            return tok

        self.llm = load(llm_tokenizer_path, "LLM")
        self.qformer = load(qformer_tokenizer_path, "Q-Former")
        self.num_query_tokens = model["num_query_tokens"]
        self.image_token_id = model["image_token_id"]
        self.qformer_max_len = model["qformer_max_text_len"]
        self.llm_max_len = model.get("llm_max_positions")  # None: no absolute limit (T5)
        self.qformer_pad_id = model.get("qformer_pad_token_id", 0)
        vocab = self.llm.get_vocab_size(with_added_tokens=True)
        if not 0 <= self.image_token_id < vocab:
            raise BundleError(f"manifest model.image_token_id {self.image_token_id} is not in the LLM tokenizer's "
                              f"vocabulary ({vocab} tokens)", hint="re-export the bundle")

    def check(self, prompt) -> str:
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be text, got {type(prompt).__name__}")
        if not prompt.strip():
            raise InputError("prompt is empty", hint="ask a question, e.g. \"Describe this image.\"")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InputError(f"prompt too long: {len(prompt)} characters (limit {MAX_PROMPT_CHARS})")
        return prompt

    def encode(self, prompt: str, max_new_tokens: int = 0, frames: int | None = None) -> dict[str, np.ndarray]:
        """One prompt -> input_ids/attention_mask (LLM) and qformer_input_ids/mask, batch 1.
        ``frames`` (a video bundle): ``num_query_tokens * frames`` placeholder ids in front, as
        ``InstructBlipVideoProcessor`` expands ``<video>``; the Q-Former ids stay one row (the
        pipeline repeats them per frame, as the model does)."""
        prompt = self.check(prompt)
        q_ids = self.qformer.encode(prompt).ids
        if len(q_ids) > self.qformer_max_len:
            raise InputError(f"prompt too long for the Q-Former: {len(q_ids)} tokens (limit {self.qformer_max_len})")
        text_ids = self.llm.encode(prompt).ids
        what = "video" if frames else "image"
        if self.image_token_id in text_ids:
            raise InputError(f"the prompt may not contain the {what} token "
                             f"({self.llm.id_to_token(self.image_token_id)!r}): the {what} goes in its own argument")
        n_image = self.num_query_tokens * (frames or 1)
        ids = [self.image_token_id] * n_image + text_ids
        if self.llm_max_len is not None and len(ids) + max_new_tokens > self.llm_max_len:
            raise InputError(
                f"prompt too long for the LLM: {len(ids)} tokens with the {n_image} {what} "
                f"tokens, + {max_new_tokens} new tokens > context {self.llm_max_len}")
        return {
            "input_ids": np.asarray([ids], np.int64),
            "attention_mask": np.ones((1, len(ids)), np.int64),
            "qformer_input_ids": np.asarray([q_ids], np.int64),
            "qformer_attention_mask": np.ones((1, len(q_ids)), np.int64),
        }

    def decode(self, ids) -> str:
        """The generated ids as answer text, without the one leading space a byte-level BPE
        tokenizer (proof-llama, OPT) puts on the first answer token as its word boundary after
        the prompt (transformers' decode keeps it: " yellow"); SentencePiece Llama/T5 tokenizers
        drop it in their own decoder (a Strip step), so answers read the same on every family."""
        text = self.llm.decode(list(map(int, ids)), skip_special_tokens=True)
        return text[1:] if text.startswith(" ") else text
