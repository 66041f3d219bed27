"""What the manifest records of the checkpoint's processor and model (the runtime reimplements
the processor from these), of each exported graph, and of the tools; and the check that the
runtime's tokenization equals the processor's."""
from __future__ import annotations

import platform
from pathlib import Path

from ib_edge.runtime.manifest import sha256_file

from . import onnx_export, specs
from .options import ExportError

PROBE_PROMPTS = ("Describe this image.", "What color is the circle?", "how MANY shapes, exactly?!",
                 "Was ist auf dem Bild? 你好 ... émoji 🙂", "a\tb\nc  d")


def tool_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("ib-edge", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tokenizers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def preprocess_record(image_processor, config) -> dict:
    ip = image_processor
    for flag in ("do_center_crop", "do_pad"):
        if getattr(ip, flag, False):
            raise ExportError(f"image processor uses {flag}, which the runtime does not implement")
    size = ip.size
    hw = [size["height"], size["width"]] if "height" in size else None
    if hw is None:
        raise ExportError(f"image processor size {dict(size)} is not a fixed height/width")
    vis = config.vision_config.image_size
    vis = [vis, vis] if isinstance(vis, int) else list(vis)
    if hw != vis:
        raise ExportError(f"processor resizes to {hw} but the vision model expects {vis}")
    return {
        "size": hw, "resample": int(ip.resample), "do_resize": bool(ip.do_resize),
        "do_rescale": bool(ip.do_rescale), "rescale_factor": float(ip.rescale_factor),
        "do_normalize": bool(ip.do_normalize), "image_mean": list(map(float, ip.image_mean)),
        "image_std": list(map(float, ip.image_std)), "do_convert_rgb": bool(getattr(ip, "do_convert_rgb", True)),
    }


def model_record(config, processor, video: dict | None = None) -> dict:
    """``video`` (``checkpoint.video_record``): a video model's kind, frame count and video token;
    its ``image_token_id`` is then the video token too (the id whose positions the LLM stage
    fills with query embeddings, all frames' in frame order)."""
    text = config.text_config
    kind = video or {"kind": "image"}
    return {
        **kind,
        "num_query_tokens": int(config.num_query_tokens),
        "image_token_id": int(video["video_token_id"] if video else config.image_token_index),
        "is_encoder_decoder": not config.use_decoder_only_language_model,
        "llm_family": text.model_type,
        "llm_hidden_size": specs.llm_hidden_size(text),
        "llm_max_positions": getattr(text, "max_position_embeddings", None),
        "qformer_max_text_len": int(config.qformer_config.max_position_embeddings),
        "qformer_pad_token_id": int(processor.qformer_tokenizer.pad_token_id or 0),
        "eos_token_id": text.eos_token_id,
    }


def hashed_files(root: Path, sub: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(sub.rglob("*")) if p.is_file()}


def graph_record(path: Path, root: Path, spec, precision: str, opset: int) -> dict:
    return {
        "file": path.name,
        "files": {str(p.relative_to(root)): sha256_file(p) for p in onnx_export.graph_files(path)},
        "precision": precision, "backend": "onnxruntime", "opset": opset,
        "inputs": [t.to_json() for t in spec.inputs],
        "outputs": [t.to_json() for t in spec.outputs],
    }


def check_tokenizers(processor, manifest_model: dict, tok_paths: dict[str, Path]) -> None:
    """The runtime's tokenization (tokenizers library on the bundle's files) must equal the
    processor's on probe prompts; otherwise answers would silently differ."""
    from ib_edge.runtime.preprocess import PromptEncoder

    enc = PromptEncoder(tok_paths["llm"], tok_paths["qformer"], manifest_model)
    frames = manifest_model.get("frames") if manifest_model.get("kind") == "video" else None
    for prompt in PROBE_PROMPTS:
        ref = processor(text=[prompt], images=None)
        ours = enc.encode(prompt, frames=frames)
        ref_ids = ([manifest_model["image_token_id"]] * manifest_model["num_query_tokens"] * (frames or 1)
                   + list(ref["input_ids"][0]))
        if list(ours["input_ids"][0]) != ref_ids:
            raise ExportError(f"runtime LLM tokenization differs from the processor's for {prompt!r}")
        if list(ours["qformer_input_ids"][0]) != list(ref["qformer_input_ids"][0]):
            raise ExportError(f"runtime Q-Former tokenization differs from the processor's for {prompt!r}")
