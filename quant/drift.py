"""Drift metrics between a reference (fp32) output and a quantized one; model-agnostic.

Two kinds: ``DriftStats`` of a graph's output tensors (``compare``) and ``LogitsDrift`` of an
LLM's next-token logits (``drift_of``: cosine and top-1 agreement).

What to expect: fp32 re-export ~1.0 cosine and SQNR > 100 dB; FP16 cosine >= 0.9999 and SQNR
~40-60 dB; good INT8 (MatMul/Conv/Gemm only) cosine >= 0.995 and SQNR ~20-35 dB. SQNR below
~15 dB or cosine below 0.98 is a broken quantization.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class DriftStats:
    cosine_mean: float
    cosine_min: float
    sqnr_db: float        # 10 log10(|ref|^2 / |ref - got|^2) over everything
    max_abs: float
    ref_max_abs: float
    samples: int

    def to_json(self) -> dict:
        return {k: (round(v, 7) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}

    def line(self) -> str:
        return (f"cosine mean {self.cosine_mean:.5f} / worst {self.cosine_min:.5f}, SQNR {self.sqnr_db:.1f} dB, "
                f"max-abs {self.max_abs:.3g} (ref max {self.ref_max_abs:.3g}), n={self.samples}")


def row_cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Cosine per sample (first axis), each sample flattened."""
    r = ref.reshape(ref.shape[0], -1).astype(np.float64)
    g = got.reshape(got.shape[0], -1).astype(np.float64)
    den = np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1)
    return np.where(den > 0, (r * g).sum(1) / np.maximum(den, 1e-300), 1.0)


def compare(refs: list[np.ndarray] | np.ndarray, gots: list[np.ndarray] | np.ndarray) -> DriftStats:
    refs = [refs] if isinstance(refs, np.ndarray) else list(refs)
    gots = [gots] if isinstance(gots, np.ndarray) else list(gots)
    if len(refs) != len(gots) or not refs:
        raise ValueError("compare needs equally many reference and quantized outputs")
    cos, sig, noise, max_abs, ref_max = [], 0.0, 0.0, 0.0, 0.0
    for r, g in zip(refs, gots):
        if r.shape != g.shape:
            raise ValueError(f"shape mismatch {r.shape} vs {g.shape}")
        r64, g64 = r.astype(np.float64), g.astype(np.float64)
        cos.extend(row_cosines(r64, g64).tolist())
        sig += float((r64 ** 2).sum())
        noise += float(((r64 - g64) ** 2).sum())
        max_abs = max(max_abs, float(np.abs(r64 - g64).max()))
        ref_max = max(ref_max, float(np.abs(r64).max()))
    if not np.all(np.isfinite([sig, noise])):
        return DriftStats(float("nan"), float("nan"), float("-inf"), float("inf"), ref_max, len(cos))
    sqnr = float("inf") if noise == 0 else 10 * np.log10(max(sig, 1e-300) / noise)
    return DriftStats(float(np.mean(cos)), float(np.min(cos)), float(sqnr), max_abs, ref_max, len(cos))


# A token is "decided" when fp32 gives its top-1 at least this probability. Top-1 flips where
# fp32 itself is near a tie are not quality loss (any rounding change, even the batch size,
# flips them; random-weight models are all near-ties): the budget counts decided tokens only,
# all-token agreement is reported beside it.
DECIDED = 0.5


@dataclasses.dataclass(frozen=True)
class LogitsDrift:
    """An LLM's next-token logits against fp32 over teacher-forced tokens."""
    cosine_mean: float
    cosine_min: float
    top1: float              # all tokens
    top1_decided: float      # tokens fp32 decides (top-1 prob >= DECIDED); 1.0 when there are none
    decided: int
    tokens: int

    def to_json(self) -> dict:
        return {"logits_cosine_mean": round(self.cosine_mean, 6), "logits_cosine_min": round(self.cosine_min, 6),
                "top1_agreement": round(self.top1, 5), "top1_agreement_decided": round(self.top1_decided, 5),
                "decided_tokens": self.decided, "tokens": self.tokens}


def drift_of(got: list, reference: list) -> LogitsDrift:
    """Drift of logits ``got`` against ``reference`` (lists of torch tensors [tokens, V])."""
    import torch

    g, r = torch.cat(got).float(), torch.cat(reference).float()
    c = torch.nn.functional.cosine_similarity(g, r, dim=-1)
    agree = g.argmax(-1) == r.argmax(-1)
    decided = r.softmax(-1).amax(-1) >= DECIDED
    n_dec = int(decided.sum())
    top1_dec = float(agree[decided].float().mean()) if n_dec else 1.0
    return LogitsDrift(float(c.mean()), float(c.min()), float(agree.float().mean()), top1_dec, n_dec, int(c.numel()))
