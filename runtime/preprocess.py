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

from .errors import InputError

# Images above this many pixels are refused before decoding (a decompression bomb would
# otherwise allocate gigabytes). 64 MP covers any real camera frame.
MAX_IMAGE_PIXELS = 64_000_000
MAX_PROMPT_CHARS = 20_000


def load_image(image):
    """A path or a PIL image -> an RGB PIL image. Every failure is an InputError."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        img = image
    else:
        path = Path(os.fspath(image))
        if not path.exists():
            raise InputError(f"image not found: {path}")
        if not path.is_file():
            raise InputError(f"image path is not a file: {path}")
        try:
            img = Image.open(path)
        except Image.DecompressionBombError as e:
            raise InputError(f"image too large: {path}: {e}", hint="downscale it first") from None
        except UnidentifiedImageError:
            raise InputError(f"not an image file (unrecognised format): {path}") from None
        except OSError as e:
            raise InputError(f"cannot read image {path}: {e}") from None
        w, h = img.size
        if w * h > MAX_IMAGE_PIXELS:
            raise InputError(f"image too large: {w}x{h} = {w * h / 1e6:.0f} MP (limit {MAX_IMAGE_PIXELS / 1e6:.0f} MP): {path}",
                             hint="downscale it first")
        try:
            img.load()  # decode now, so truncation shows here and not mid-pipeline
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise InputError(f"cannot decode image {path}: {e}") from None
    if img.width < 1 or img.height < 1:
        raise InputError("image is empty (0 pixels)")
    return to_rgb(img)


def to_rgb(img):
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

        self.llm = Tokenizer.from_file(str(llm_tokenizer_path))
        self.qformer = Tokenizer.from_file(str(qformer_tokenizer_path))
        self.llm.no_padding(); self.llm.no_truncation()
        self.qformer.no_padding(); self.qformer.no_truncation()
        self.num_query_tokens = model["num_query_tokens"]
        self.image_token_id = model["image_token_id"]
        self.qformer_max_len = model["qformer_max_text_len"]
        self.llm_max_len = model.get("llm_max_positions")  # None: no absolute limit (T5)
        self.qformer_pad_id = model.get("qformer_pad_token_id", 0)

    def check(self, prompt) -> str:
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be text, got {type(prompt).__name__}")
        if not prompt.strip():
            raise InputError("prompt is empty", hint="ask a question, e.g. \"Describe this image.\"")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InputError(f"prompt too long: {len(prompt)} characters (limit {MAX_PROMPT_CHARS})")
        return prompt

    def encode(self, prompt: str, max_new_tokens: int = 0) -> dict[str, np.ndarray]:
        """One prompt -> input_ids/attention_mask (LLM) and qformer_input_ids/mask, batch 1."""
        prompt = self.check(prompt)
        q_ids = self.qformer.encode(prompt).ids
        if len(q_ids) > self.qformer_max_len:
            raise InputError(f"prompt too long for the Q-Former: {len(q_ids)} tokens (limit {self.qformer_max_len})")
        ids = [self.image_token_id] * self.num_query_tokens + self.llm.encode(prompt).ids
        if self.llm_max_len is not None and len(ids) + max_new_tokens > self.llm_max_len:
            raise InputError(
                f"prompt too long for the LLM: {len(ids)} tokens with the {self.num_query_tokens} image "
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
