"""Export specs as data: one frozen record per graph, in a registry keyed by stage.

A spec names the graph's boundary tensors (the same names the runtime and the manifest use:
``pixel_values -> image_embeds -> query_embeds``), their symbolic shapes, the opset, how to
make inputs for tracing and validation, and the tolerance the exported graph is held to.
Shapes come from the model's config, never from constants: any ``InstructBlipConfig`` works.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

# Symbolic axis names, shared by specs, manifest and runtime.
BATCH = "batch"
TEXT = "text_len"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                       # numpy dtype name: "float32" | "int64"
    shape: tuple[int | str, ...]     # ints are fixed, strings are dynamic axes

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Exported fp32 graph vs PyTorch fp32. Chosen from measurements: dynamo-exported graphs
    matched eager to max-abs 5e-6 (vision) and 3.3e-7 (Q-Former) on tiny models; real-size
    graphs accumulate more rounding (longer reductions), hence 1e-4 relative to the output's
    magnitude, and a cosine floor that only a real export bug breaks."""
    min_cosine: float = 0.99999
    max_abs_rel: float = 1e-4        # max-abs error / max-abs reference value


@dataclasses.dataclass(frozen=True)
class GraphSpec:
    stage: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    make_inputs: Callable[[np.random.Generator, int, int], dict[str, np.ndarray]]
    opset: int = 18
    tolerance: Tolerance = Tolerance()

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


def _image_hw(vision_config) -> tuple[int, int]:
    size = vision_config.image_size
    return (size, size) if isinstance(size, int) else tuple(size)


def _num_patches(vision_config) -> int:
    h, w = _image_hw(vision_config)
    p = vision_config.patch_size
    ph, pw = (p, p) if isinstance(p, int) else tuple(p)
    return (h // ph) * (w // pw)


def llm_hidden_size(text_config) -> int:
    return getattr(text_config, "hidden_size", None) or text_config.d_model


def vision_spec(config) -> GraphSpec:
    v = config.vision_config
    h, w = _image_hw(v)
    seq = _num_patches(v) + 1  # + class token

    def make_inputs(rng: np.random.Generator, batch: int, text_len: int) -> dict[str, np.ndarray]:
        # Normalised pixels: roughly what CLIP normalisation gives for natural images.
        return {"pixel_values": rng.normal(0.0, 1.0, (batch, 3, h, w)).astype(np.float32)}

    return GraphSpec(
        stage="vision",
        inputs=(TensorSpec("pixel_values", "float32", (BATCH, 3, h, w)),),
        outputs=(TensorSpec("image_embeds", "float32", (BATCH, seq, v.hidden_size)),),
        make_inputs=make_inputs,
    )


def qformer_spec(config) -> GraphSpec:
    v, q = config.vision_config, config.qformer_config
    seq = _num_patches(v) + 1
    vocab, pad = q.vocab_size, q.pad_token_id or 0

    def make_inputs(rng: np.random.Generator, batch: int, text_len: int) -> dict[str, np.ndarray]:
        ids = rng.integers(0, vocab, (batch, text_len), dtype=np.int64)
        mask = np.ones((batch, text_len), dtype=np.int64)
        for b in range(1, batch):  # right padding as the Q-Former tokenizer pads; row 0 full
            keep = int(rng.integers(1, text_len + 1))
            mask[b, keep:] = 0
            ids[b, keep:] = pad
        return {
            "image_embeds": rng.normal(0.0, 1.0, (batch, seq, v.hidden_size)).astype(np.float32),
            "qformer_input_ids": ids,
            "qformer_attention_mask": mask,
        }

    return GraphSpec(
        stage="qformer",
        inputs=(
            TensorSpec("image_embeds", "float32", (BATCH, seq, v.hidden_size)),
            TensorSpec("qformer_input_ids", "int64", (BATCH, TEXT)),
            TensorSpec("qformer_attention_mask", "int64", (BATCH, TEXT)),
        ),
        outputs=(TensorSpec("query_embeds", "float32",
                            (BATCH, config.num_query_tokens, llm_hidden_size(config.text_config))),),
        make_inputs=make_inputs,
    )


# The registry: stage name -> spec factory. Export iterates it; nothing dispatches on model names.
GRAPH_SPECS: dict[str, Callable] = {"vision": vision_spec, "qformer": qformer_spec}
