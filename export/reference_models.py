"""Small InstructBLIP checkpoints built offline: tokenizers, processor and weights.

Real checkpoints cannot be downloaded on the project's machines, so tests and the proof
models use checkpoints this module builds from nothing: a byte-level BPE LLM tokenizer that
has the ``<image>`` token, a WordPiece (BERT-style) Q-Former tokenizer, an
``InstructBlipProcessor`` and ``save_pretrained`` output that loads through the very same
``from_pretrained`` path as ``Salesforce/instructblip-*``.

``--video`` builds ``InstructBlipVideoForConditionalGeneration`` checkpoints instead: the LLM
tokenizer has a ``<video>`` token (the config's ``video_token_index``), and the processor files
are what ``InstructBlipVideoProcessor.save_pretrained`` writes (``video_preprocessor_config.json``
written as JSON: transformers' ``InstructBlipVideoVideoProcessor`` needs torchvision, whose wheel
does not import beside the CPU torch here).

    python -m ib_edge.export.reference_models --family llama --out /tmp/tiny-llama [--video]
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import string
from pathlib import Path

# Text both tokenizers are trained on: the proof task's words plus a little general English,
# so that arbitrary prompts tokenize into something other than byte soup.
CORPUS = """\
what color is the circle square triangle what shape is the red green blue yellow purple orange object
how many shapes are there one two three is the on the left or the right describe this image
a red circle and a blue square a green triangle yellow purple orange
describe the picture in detail please answer the question briefly what is shown in this photo
is there a person a dog a cat a car a tree in the image where is it how many people are there
the quick brown fox jumps over the lazy dog while the sun sets behind the hills
caption this image write a short description count the objects reason about the scene
which object is bigger what is unusual about this image why is it there what happens next
Question: Answer: yes no maybe left right top bottom center middle background foreground
What? Yes, it is. No! (maybe) 0 1 2 3 4 5 6 7 8 9 10 "quoted" it's a-b: c; d/e.
"""

PUNCTUATION = string.punctuation
LLM_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
VIDEO_TOKEN = "<video>"  # InstructBlipVideoProcessor's placeholder (it adds it when a tokenizer lacks it)
QFORMER_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _corpus_lines(extra: list[str] | None) -> list[str]:
    lines = [ln for ln in CORPUS.splitlines() if ln.strip()]
    return lines + list(extra or [])


def build_llm_tokenizer(family: str, vocab_size: int = 512, extra_text: list[str] | None = None,
                        video: bool = False):
    """Byte-level BPE tokenizer wrapped as a transformers fast tokenizer.

    Special-token placement follows the real families: Llama prepends ``<s>``, OPT prepends
    ``</s>`` (its BOS is ``</s>``), T5 appends ``</s>`` and has no BOS. ``video``: ``<video>``
    is one more special token (after the image one, so the other ids do not move).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=LLM_SPECIALS + ([VIDEO_TOKEN] if video else []),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(extra_text), trainer=trainer)
    ids = {t: tok.token_to_id(t) for t in LLM_SPECIALS}
    if family == "llama":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", ids["<s>"])])
        bos = "<s>"
    elif family == "opt":
        tok.post_processor = processors.TemplateProcessing(
            single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", ids["</s>"])])
        bos = "</s>"
    elif family == "t5":
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", ids["</s>"])])
        bos = None
    else:
        raise ValueError(f"unknown LLM family {family!r} (llama, opt or t5)")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>",
    )
    # No ``image_token`` attribute: InstructBlipProcessor (transformers 5.24) then registers
    # "<image>" itself as an AddedToken; given a str attribute it fails on images
    # ("'str' object has no attribute 'content'").
    fast.padding_side = "left" if family != "t5" else "right"
    return fast


def build_qformer_tokenizer(extra_text: list[str] | None = None):
    """Lower-casing WordPiece tokenizer shaped like bert-base-uncased ([CLS] ... [SEP]).

    The vocabulary is built directly (specials, characters, ``##``-characters, whole words,
    all sorted) instead of with ``WordPieceTrainer``, whose output changes from run to run."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    text = " ".join(_corpus_lines(extra_text)).lower()
    words = set(re.findall(r"[a-z0-9]+", text))
    chars = set("".join(words)) | set(PUNCTUATION)
    vocab = list(QFORMER_SPECIALS) + sorted(chars) + sorted("##" + c for c in chars if c.isalnum())
    vocab += sorted(w for w in words if len(w) > 1)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls_id, sep_id = vocab.index("[CLS]"), vocab.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", padding_side="right")


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """Shape of a reference checkpoint. Families use different shapes on purpose: nothing in
    export or runtime may assume an image size, patch size, query count or hidden size."""
    family: str
    image_size: int = 224
    patch_size: int = 14
    vision_hidden: int = 64
    vision_layers: int = 2
    num_query_tokens: int = 16
    qformer_hidden: int = 64
    qformer_layers: int = 2
    text_hidden: int = 128
    text_layers: int = 2
    heads: int = 4


REFERENCE_SPECS = {
    "llama": TinySpec("llama"),
    "opt": TinySpec("opt", image_size=96, patch_size=16, num_query_tokens=8, vision_hidden=96,
                    qformer_hidden=96),
    "t5": TinySpec("t5", image_size=112, patch_size=14, num_query_tokens=12),
}


def make_config(spec: TinySpec, llm_tok, qformer_tok, video: bool = False):
    """An ``InstructBlipConfig``, or with ``video`` an ``InstructBlipVideoConfig`` (the same
    sub-configs; ``video_token_index`` instead of ``image_token_index``)."""
    from transformers import InstructBlipConfig, InstructBlipVideoConfig, LlamaConfig, OPTConfig, T5Config

    image_token_id = llm_tok.convert_tokens_to_ids("<image>")
    common = dict(vocab_size=len(llm_tok), pad_token_id=llm_tok.pad_token_id,
                  eos_token_id=llm_tok.eos_token_id)
    if spec.family == "llama":
        text = LlamaConfig(hidden_size=spec.text_hidden, intermediate_size=2 * spec.text_hidden,
                           num_hidden_layers=spec.text_layers, num_attention_heads=spec.heads,
                           num_key_value_heads=spec.heads, max_position_embeddings=256,
                           bos_token_id=llm_tok.bos_token_id, tie_word_embeddings=False, **common)
    elif spec.family == "opt":
        text = OPTConfig(hidden_size=spec.text_hidden, ffn_dim=2 * spec.text_hidden,
                         num_hidden_layers=spec.text_layers, num_attention_heads=spec.heads,
                         word_embed_proj_dim=spec.text_hidden, max_position_embeddings=256,
                         bos_token_id=llm_tok.bos_token_id, **common)
    elif spec.family == "t5":
        text = T5Config(d_model=spec.text_hidden, d_kv=spec.text_hidden // spec.heads,
                        d_ff=2 * spec.text_hidden, num_layers=spec.text_layers,
                        num_decoder_layers=spec.text_layers, num_heads=spec.heads,
                        feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                        decoder_start_token_id=llm_tok.pad_token_id, **common)
    else:
        raise ValueError(f"unknown LLM family {spec.family!r}")
    placeholder = dict(image_token_index=image_token_id)
    if video:
        vocab = llm_tok.get_vocab()
        if VIDEO_TOKEN not in vocab:
            raise ValueError(f"the LLM tokenizer has no {VIDEO_TOKEN} token (build_llm_tokenizer(..., video=True))")
        placeholder = dict(video_token_index=vocab[VIDEO_TOKEN])
    return (InstructBlipVideoConfig if video else InstructBlipConfig)(
        vision_config=dict(hidden_size=spec.vision_hidden, intermediate_size=4 * spec.vision_hidden,
                           num_hidden_layers=spec.vision_layers, num_attention_heads=spec.heads,
                           image_size=spec.image_size, patch_size=spec.patch_size,
                           initializer_range=0.02),  # default 1e-10 makes image_embeds ~1e-5
        qformer_config=dict(vocab_size=len(qformer_tok), hidden_size=spec.qformer_hidden,
                            num_hidden_layers=spec.qformer_layers, num_attention_heads=spec.heads,
                            intermediate_size=4 * spec.qformer_hidden, cross_attention_frequency=1,
                            encoder_hidden_size=spec.vision_hidden,
                            pad_token_id=qformer_tok.pad_token_id),
        text_config=text.to_dict(),
        num_query_tokens=spec.num_query_tokens,
        **placeholder,
    )


def build_processor(spec: TinySpec, llm_tok, qformer_tok):
    from transformers import InstructBlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    image_processor = BlipImageProcessorPil(size={"height": spec.image_size, "width": spec.image_size})
    return InstructBlipProcessor(image_processor=image_processor, tokenizer=llm_tok,
                                 qformer_tokenizer=qformer_tok, num_query_tokens=spec.num_query_tokens)


class VideoProcessorFiles:
    """What ``InstructBlipVideoProcessor.save_pretrained`` writes, without its video processor
    class (it imports torchvision): the LLM tokenizer (with ``<video>``), the Q-Former tokenizer
    in ``qformer_tokenizer/``, ``video_preprocessor_config.json`` (the BLIP resize and
    normalisation, the same fields as the image processor's) and ``processor_config.json``."""

    def __init__(self, spec: TinySpec, tokenizer, qformer_tokenizer):
        self.spec, self.tokenizer, self.qformer_tokenizer = spec, tokenizer, qformer_tokenizer
        self.num_query_tokens = spec.num_query_tokens

    def video_processor_config(self) -> dict:
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        return {"video_processor_type": "InstructBlipVideoVideoProcessor", "processor_class": "InstructBlipVideoProcessor",
                "size": {"height": self.spec.image_size, "width": self.spec.image_size}, "resample": 3,
                "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "do_convert_rgb": True,
                "do_center_crop": False, "do_sample_frames": False}

    def save_pretrained(self, out) -> None:
        import json

        out = Path(out)
        self.tokenizer.save_pretrained(out)
        self.qformer_tokenizer.save_pretrained(out / "qformer_tokenizer")
        (out / "video_preprocessor_config.json").write_text(
            json.dumps(self.video_processor_config(), indent=2) + "\n", encoding="utf-8")
        (out / "processor_config.json").write_text(json.dumps(
            {"processor_class": "InstructBlipVideoProcessor", "num_query_tokens": self.num_query_tokens},
            indent=2) + "\n", encoding="utf-8")


def build_model(spec: TinySpec, seed: int = 0, extra_text: list[str] | None = None, video: bool = False):
    """Returns (model, processor) with sane random weights (seeded). ``video``: an
    ``InstructBlipVideoForConditionalGeneration`` and its ``VideoProcessorFiles``."""
    import torch
    from transformers import InstructBlipForConditionalGeneration, InstructBlipVideoForConditionalGeneration

    llm_tok = build_llm_tokenizer(spec.family, extra_text=extra_text, video=video)
    qformer_tok = build_qformer_tokenizer(extra_text=extra_text)
    config = make_config(spec, llm_tok, qformer_tok, video=video)
    torch.manual_seed(seed)
    model = (InstructBlipVideoForConditionalGeneration if video else InstructBlipForConditionalGeneration)(config)
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.5)  # zeros would make every query identical
    model.eval()
    if video:
        return model, VideoProcessorFiles(spec, llm_tok, qformer_tok)
    return model, build_processor(spec, llm_tok, qformer_tok)


def save_reference(family: str, out: Path, seed: int = 0, video: bool = False) -> Path:
    import torch

    model, processor = build_model(REFERENCE_SPECS[family], seed=seed, video=video)
    if family == "t5":
        # transformers 5 always ties T5's lm_head to its embeddings; at the default std 1.0 the
        # decoder echoes its start token forever, which would make greedy parity tests vacuous.
        with torch.no_grad():
            model.language_model.shared.weight.normal_(0.0, 0.1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors
    processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=sorted(REFERENCE_SPECS), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--video", action="store_true", help="an InstructBlipVideoForConditionalGeneration checkpoint")
    args = ap.parse_args(argv)
    print(save_reference(args.family, args.out, args.seed, video=args.video))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
