"""Weight-only INT8 and mixed 4/8-bit LLMs for any family (T5, OPT, Llama), the precision of
each linear chosen by measured logits drift.

Search apart from apply (llm-awq style):

- ``sensitivities``: each ``nn.Linear`` (lm_head included) alone in int4 (RTN,
  ``quant.int4.quantize_rtn``) on the real CPU kernel, everything else fp32; the drift of the
  LLM's logits against fp32 on calibration tokens.
- ``search_plan``: start all-int4, promote the most sensitive linears to int8 one at a time
  (then to fp32, only if all-int8 is not enough) until the search budget holds. The result is
  a small JSON plan {linear: "int4"|"int8"|"fp32"} plus the sensitivities and the drift achieved.
- ``plan_tensors`` / ``save_weight_only``: apply a plan deterministically and write the
  ``ib-edge-weight-only`` checkpoint (``runtime.lowbit`` documents the layout and loads it).

The drift is measured by a ``LogitsProbe``, the one place that knows model families: it feeds
what the LLM really sees (query embeddings in the prompt's <image> slots, then the instruction)
and teacher-forces the fp32 model's own greedy answer, so every calibration token is a
decision the model makes at inference (encoder-decoder: the decoder's positions; decoder-only:
the last prompt position and the answer's).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ib_edge.runtime.errors import IbEdgeError
from ib_edge.runtime.lowbit import (PRECISIONS, WO_FORMAT, WO_FORMAT_VERSION, HFInt4Linear, Int8Linear,
                                    load_weight_only)

from .int4 import quantize_rtn

PLAN_FORMAT = "ib-edge-weight-only-plan"
PLAN_FILE = "quant_plan.json"
MODES = ("int8", "mixed")


class WeightOnlyError(IbEdgeError):
    pass


# --- drift budgets ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Budget:
    min_cosine_mean: float      # mean over calibration tokens of cos(logits_q, logits_fp32)
    min_top1: float             # fraction of decided tokens (fp32 top-1 prob >= DECIDED) whose argmax equals fp32's
    reason: str = ""

    def violations(self, d: "Drift", what: str) -> list[str]:
        out = []
        if not d.cosine_mean >= self.min_cosine_mean:
            out.append(f"{what}: logits cosine mean {d.cosine_mean:.5f} < {self.min_cosine_mean}")
        if not d.top1_decided >= self.min_top1:
            out.append(f"{what}: top-1 agreement on decided tokens {d.top1_decided:.4f} < {self.min_top1} "
                       f"({d.decided} of {d.tokens} tokens decided)")
        return out


_WHY = ("measured on the first proof-t5 (g128, 241 calibration / 73 held-out tokens): all-int8 logits cosine "
        "0.99999, top-1 1.0; all-int4 RTN 0.9980, top-1 0.992 (held-out 0.986); on 1000 fresh proof-task "
        "questions int8 changes 3 answers, all-int4 5, int4 + lm_head int8 1. 0.999 sits between int8 and "
        "all-int4, so the search keeps the linears that move logits most (lm_head first) in int8. The shipped "
        "proof-t5: int8 1000/1000 and mixed 999/1000 answers as fp32, all-int4 held-out cosine 0.99794")
# search on the calibration split; validation on held-out images, a little looser so that the
# plan chosen at the edge of the search budget is not rejected for sampling noise alone
SEARCH_BUDGET = Budget(0.999, 0.99, _WHY)
VALIDATION_BUDGET = Budget(0.998, 0.98, _WHY + "; held-out inputs, never searched on")
# 4-bit Llama bundles (--llm-quant rtn|gptq|awq), checked through the fast runtime's default
# engine: a floor that catches a broken artifact (wrong packing, failed calibration), not a
# quality target; the bench reports the quality figures.
INT4_VALIDATION_BUDGET = Budget(0.9, 0.95, (
    "measured on proof-llama held-out (14 examples, 64 teacher-forced tokens), ort engine: RTN g128 logits "
    "cosine 0.98899, GPTQ 0.99981 (text-only calibration 0.99876), AWQ 0.99854 (text-only 0.99710), "
    "decided top-1 0.984-1.0; the same RTN bundle with every nibble inverted: cosine 0.52 (tiny reference "
    "Llama: -0.40), top-1 0.0. Random-weight models score low however correct the packing (1.1 B RTN g128: "
    "~0.75), hence --llm-validation record for them"))


# A token is "decided" when fp32 gives its top-1 at least this probability. Top-1 flips where
# fp32 itself is near a tie are not quality loss (any rounding change, even the batch size,
# flips them; random-weight models are all near-ties): the budget counts decided tokens only,
# all-token agreement is reported beside it.
DECIDED = 0.5


@dataclasses.dataclass(frozen=True)
class Drift:
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


# --- int8 weights ----------------------------------------------------------------------------
@dataclasses.dataclass
class Int8Weight:
    q: torch.Tensor          # int8 [N, K], -127..127
    scales: torch.Tensor     # float32 [N]

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scales[:, None]

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.int8_weight": self.q.contiguous(), f"{name}.int8_scales": self.scales.float().contiguous()}


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """Symmetric per output channel: scale = max|w_row| / 127, q = round(w / scale)."""
    w = w.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(q, scales)


def int4_supported(lin: nn.Linear, group_size: int) -> bool:
    return lin.in_features % group_size == 0


def quantized_module(lin: nn.Linear, precision: str, group_size: int) -> nn.Module:
    """The runtime module for ``lin`` at ``precision`` (real kernels, as the runtime loads it)."""
    bias = None if lin.bias is None else lin.bias.detach()
    if precision == "int8":
        w = quantize_int8(lin.weight)
        return Int8Linear(w.q, w.scales, bias)
    if precision == "int4":
        t = quantize_rtn(lin.weight, group_size).tensors("w")
        return HFInt4Linear.from_int4(t["w.qweight"], t["w.scales"], t["w.qzeros"], group_size, bias)
    return lin


def linear_names(model: nn.Module) -> list[str]:
    """Every nn.Linear of the model, lm_head included, in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


class Swapper:
    """Holds each linear's fp32/int8/int4 modules and sets one linear's precision in place."""

    def __init__(self, model: nn.Module, names: list[str], group_size: int):
        self.model, self.group_size = model, group_size
        self.fp32 = {n: model.get_submodule(n) for n in names}
        self.cache: dict[tuple[str, str], nn.Module] = {}
        self.current = {n: "fp32" for n in names}

    def set(self, name: str, precision: str) -> None:
        if precision not in PRECISIONS:
            raise WeightOnlyError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        if precision != "fp32" and (name, precision) not in self.cache:
            self.cache[(name, precision)] = quantized_module(self.fp32[name], precision, self.group_size)
        mod = self.fp32[name] if precision == "fp32" else self.cache[(name, precision)]
        parent, _, attr = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, attr, mod)
        self.current[name] = precision

    def apply(self, plan: dict[str, str]) -> None:
        for n, p in plan.items():
            if self.current[n] != p:
                self.set(n, p)

    def restore(self) -> None:
        self.apply({n: "fp32" for n in self.fp32})


# --- the probe: model-family knowledge in one place -----------------------------------------------
class LogitsProbe:
    """fp32 reference logits on what the LLM sees, and the drift of any variant of the model.

    ``examples``: objects with ``input_ids`` [T] (the prompt, <image> slots included) and
    ``query_embeds`` [Q, D] (``quant.llm_quant.Example``). Examples run in right-padded batches
    of ``batch`` (causal decoders never see the padding; the encoder masks it), so one drift
    measurement is a few forward passes."""

    def __init__(self, model: nn.Module, examples, image_token_id: int, max_new_tokens: int = 16, batch: int = 16):
        if not examples:
            raise WeightOnlyError("no calibration examples for the LLM drift probe")
        self.encoder_decoder = bool(model.config.is_encoder_decoder)
        embeds = []
        with torch.no_grad():
            for e in examples:
                ids = torch.from_numpy(np.asarray(e.input_ids, dtype=np.int64))[None]
                emb = model.get_input_embeddings()(ids)
                if e.query_embeds is not None:
                    mask = (ids == image_token_id).unsqueeze(-1)
                    emb = emb.masked_scatter(mask, torch.from_numpy(np.asarray(e.query_embeds)).to(emb.dtype))
                embeds.append(emb[0])
            answers = self._greedy(model, embeds, max_new_tokens, batch)
        # (prompt embeds [T, D], ids fed to produce the answer positions); encoder-decoder: the
        # answer is [start, a1..an] and the decoder is fed [start, a1..a(n-1)]; decoder-only: it is
        # [a1..an], the prompt's last position predicts a1, then a1..a(n-1) are fed
        rows = [(e, a[:-1]) for e, a in zip(embeds, answers) if len(a) > (1 if self.encoder_decoder else 0)]
        if not rows:
            raise WeightOnlyError("the fp32 LLM generated nothing on the calibration examples")
        self.batches = [self._batch(model, rows[i:i + batch]) for i in range(0, len(rows), batch)]
        self.reference = [self._logits(model, b) for b in self.batches]
        self.tokens = sum(r.shape[0] for r in self.reference)

    def _greedy(self, model, embeds, max_new_tokens: int, batch: int) -> list[torch.Tensor]:
        """fp32 greedy answers; encoder-decoders in right-padded batches (the encoder masks the
        padding), decoder-only one prompt at a time (no left-padding subtleties)."""
        if not self.encoder_decoder:
            return [model.generate(inputs_embeds=e[None], attention_mask=torch.ones(1, e.shape[0], dtype=torch.long),
                                   max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)[0] for e in embeds]
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        out = []
        for i in range(0, len(embeds), batch):
            chunk = embeds[i:i + batch]
            t = max(e.shape[0] for e in chunk)
            emb, attn = torch.zeros(len(chunk), t, chunk[0].shape[-1]), torch.zeros(len(chunk), t, dtype=torch.long)
            for j, e in enumerate(chunk):
                emb[j, :e.shape[0]], attn[j, :e.shape[0]] = e, 1
            gen = model.generate(inputs_embeds=emb, attention_mask=attn, max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1)
            for row in gen:
                stop = next((k + 1 for k in range(1, len(row)) if int(row[k]) in eos), len(row))
                out.append(row[:stop])
        return out

    def _batch(self, model, rows) -> dict:
        d = rows[0][0].shape[-1]
        if self.encoder_decoder:
            t = max(e.shape[0] for e, _ in rows)
            n = max(len(f) for _, f in rows)
            emb, attn = torch.zeros(len(rows), t, d), torch.zeros(len(rows), t, dtype=torch.long)
            dec = torch.full((len(rows), n), int(model.config.decoder_start_token_id or 0), dtype=torch.long)
            sel = []
            for i, (e, f) in enumerate(rows):
                emb[i, :e.shape[0]], attn[i, :e.shape[0]], dec[i, :len(f)] = e, 1, f
                sel += [(i, j) for j in range(len(f))]
            return {"inputs_embeds": emb, "attention_mask": attn, "decoder_input_ids": dec, "select": sel}
        full = [torch.cat([e, model.get_input_embeddings()(f)]) for e, f in rows]
        t = max(x.shape[0] for x in full)
        emb, attn = torch.zeros(len(rows), t, d), torch.zeros(len(rows), t, dtype=torch.long)
        sel = []
        for i, ((e, f), x) in enumerate(zip(rows, full)):
            emb[i, :x.shape[0]], attn[i, :x.shape[0]] = x, 1
            sel += [(i, e.shape[0] - 1 + j) for j in range(len(f) + 1)]
        return {"inputs_embeds": emb, "attention_mask": attn, "select": sel}

    @torch.no_grad()
    def _logits(self, model, b) -> torch.Tensor:
        """Logits [tokens, V] at the positions that predict the answer tokens."""
        kw = {k: v for k, v in b.items() if k != "select"}
        logits = model(**kw).logits
        rows, cols = zip(*b["select"])
        return logits[list(rows), list(cols)].float()

    @torch.no_grad()
    def drift(self, model: nn.Module) -> Drift:
        return drift_of([self._logits(model, b) for b in self.batches], self.reference)

    @torch.no_grad()
    def drift_stepwise(self, model) -> Drift:
        """Drift of a decoder-only model that returns last-position logits from a static KV
        cache (the fast runtime's engines, ``model(x, start)``), run as it generates: each row
        prefilled up to its prompt's last position, then teacher-forced one token at a time."""
        if self.encoder_decoder:
            raise WeightOnlyError("stepwise drift is for decoder-only LLMs")
        got = []
        for b in self.batches:
            out = []
            for i in dict.fromkeys(r for r, _ in b["select"]):      # rows in order
                cols = [c for r, c in b["select"] if r == i]        # consecutive positions
                first, last = cols[0], cols[-1]
                x = b["inputs_embeds"][i:i + 1, :last + 1]
                model.setup_cache(last + 1)
                out.append(model(x[:, :first + 1], 0).float())
                out += [model(x[:, p:p + 1], p).float() for p in range(first + 1, last + 1)]
            got.append(torch.cat(out))
        return drift_of(got, self.reference)


def drift_of(got: list[torch.Tensor], reference: list[torch.Tensor]) -> Drift:
    """Drift of logits ``got`` against ``reference`` (lists of [tokens, V])."""
    g, r = torch.cat(got).float(), torch.cat(reference).float()
    c = torch.nn.functional.cosine_similarity(g, r, dim=-1)
    agree = g.argmax(-1) == r.argmax(-1)
    decided = r.softmax(-1).amax(-1) >= DECIDED
    n_dec = int(decided.sum())
    top1_dec = float(agree[decided].float().mean()) if n_dec else 1.0
    return Drift(float(c.mean()), float(c.min()), float(agree.float().mean()), top1_dec, n_dec, int(c.numel()))


# --- search ------------------------------------------------------------------------------------
def sensitivities(swapper: Swapper, measure, log=lambda m: None) -> list[dict]:
    """Each linear alone in int4 (the rest fp32): its drift, most sensitive first. Linears whose
    in_features the group size does not divide cannot be int4 and are listed as such."""
    out = []
    swapper.restore()
    for name, lin in swapper.fp32.items():
        if not int4_supported(lin, swapper.group_size):
            out.append({"name": name, "int4": False})
            continue
        swapper.set(name, "int4")
        d = measure()
        swapper.set(name, "fp32")
        out.append({"name": name, "int4": True, **d.to_json()})
    out.sort(key=lambda r: (not r["int4"], r.get("logits_cosine_mean", 0), r.get("top1_agreement", 0)))
    for r in out[:5]:
        if r["int4"]:
            log(f"      int4 sensitivity {r['name']}: cosine {r['logits_cosine_mean']:.5f}, "
                f"top-1 {r['top1_agreement']:.4f}")
    return out


def search_plan(swapper: Swapper, measure, budget: Budget = SEARCH_BUDGET, log=lambda m: None) -> dict:
    """All-int4 first, then promote in sensitivity order to int8, then (only if all-int8 misses
    the budget) to fp32, measuring after each promotion, until ``budget`` holds."""
    sens = sensitivities(swapper, measure, log)
    plan = {r["name"]: "int4" if r["int4"] else "int8" for r in sens}
    swapper.apply(plan)
    start = d = measure()
    promoted = []
    for target in ("int8", "fp32"):
        for r in sens:
            if not budget.violations(d, ""):
                break
            if PRECISIONS.index(plan[r["name"]]) < PRECISIONS.index(target):
                plan[r["name"]] = target
                swapper.set(r["name"], target)
                d = measure()
                promoted.append({"name": r["name"], "to": target, **d.to_json()})
    bad = budget.violations(d, "LLM search")
    swapper.restore()
    if bad:
        raise WeightOnlyError("; ".join(bad) + " even with every linear in fp32",
                              hint="the probe or the model is broken; export without --llm-quant")
    order = [r["name"] for r in sens]
    return {"precisions": {n: plan[n] for n in swapper.fp32}, "sensitivity": sens, "promoted": promoted,
            "drift_all_int4": start.to_json(), "drift": d.to_json(),
            "budget": {"min_cosine_mean": budget.min_cosine_mean, "min_top1": budget.min_top1},
            "order": order}


def make_plan(model: nn.Module, probe: LogitsProbe, mode: str, group_size: int, log=lambda m: None) -> dict:
    """The plan record for ``mode`` ("int8": every linear int8; "mixed": searched)."""
    if mode not in MODES:
        raise WeightOnlyError(f"weight-only mode {mode!r} is not one of {', '.join(MODES)}")
    names = linear_names(model)
    sw = Swapper(model, names, group_size)
    measure = lambda: probe.drift(model)  # noqa: E731
    if mode == "int8":
        sw.apply({n: "int8" for n in names})
        d = measure()
        sw.restore()
        rec = {"precisions": {n: "int8" for n in names}, "drift": d.to_json()}
    else:
        rec = search_plan(sw, measure, SEARCH_BUDGET, log)
    return {"format": PLAN_FORMAT, "version": 1, "mode": mode, "group_size": group_size,
            "calibration_tokens": probe.tokens, **rec}


def counts(precisions: dict[str, str]) -> dict[str, int]:
    return {p: sum(1 for v in precisions.values() if v == p) for p in PRECISIONS}


def load_plan(path: str | Path) -> dict:
    """A saved plan (the JSON file, or a bundle / llm dir holding it)."""
    p = Path(path)
    for cand in (p, p / PLAN_FILE, p / "llm" / PLAN_FILE):
        if cand.is_file():
            try:
                plan = json.loads(cand.read_text(encoding="utf-8"))
            except ValueError as e:
                raise WeightOnlyError(f"corrupt LLM plan {cand}: {e}") from None
            if plan.get("format") != PLAN_FORMAT or plan.get("version") != 1:
                raise WeightOnlyError(f"{cand} is not an {PLAN_FORMAT} v1 file")
            bad = {v for v in plan.get("precisions", {}).values()} - set(PRECISIONS)
            if bad or not plan.get("precisions"):
                raise WeightOnlyError(f"{cand}: precisions must be {', '.join(PRECISIONS)}")
            return plan
    raise WeightOnlyError(f"no LLM plan at {p} (expected {PLAN_FILE} or a bundle with llm/{PLAN_FILE})")


# --- apply -----------------------------------------------------------------------------------
def plan_tensors(model: nn.Module, stored: dict[str, torch.Tensor], precisions: dict[str, str],
                 group_size: int) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: ``stored`` (the fp32 checkpoint as saved, tied weights once)
    with each int4/int8 linear's ``.weight`` replaced by its quantized entries."""
    names = set(linear_names(model))
    unknown = sorted(set(precisions) - names)
    missing = sorted(names - set(precisions))
    if unknown or missing:
        raise WeightOnlyError(f"LLM plan does not match this model: unknown {unknown[:3]}, missing {missing[:3]}",
                              hint="search a new plan (--llm-quant mixed without --llm-plan)")
    out = {k: (t.float() if t.is_floating_point() else t).contiguous() for k, t in stored.items()}
    for name, prec in precisions.items():
        lin = model.get_submodule(name)
        if prec == "fp32":
            continue
        out.pop(f"{name}.weight", None)    # absent when tied (lm_head): the quantized copy is its own
        if prec == "int8":
            out.update(quantize_int8(lin.weight).tensors(name))
        else:
            if not int4_supported(lin, group_size):
                raise WeightOnlyError(f"{name}: in_features {lin.in_features} is not a multiple of group size "
                                      f"{group_size}; it cannot be int4")
            out.update(quantize_rtn(lin.weight, group_size).tensors(name))
        if lin.bias is not None:
            out[f"{name}.bias"] = lin.bias.detach().float().contiguous()
    return out


def load_fp32(src_dir: str | Path) -> nn.Module:
    """The fp32 transformers LLM saved in ``src_dir`` (seq2seq or causal, from its config)."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(str(src_dir), trust_remote_code=False)
    auto = transformers.AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else transformers.AutoModelForCausalLM
    return auto.from_pretrained(str(src_dir), dtype=torch.float32, use_safetensors=True,
                              trust_remote_code=False).eval()


def save_weight_only(model: nn.Module, src_dir: str | Path, out_dir: str | Path, plan: dict) -> dict:
    """Apply ``plan`` to ``model`` (the fp32 checkpoint saved in ``src_dir``) and write the
    ib-edge-weight-only checkpoint (+ the plan as ``quant_plan.json``) to ``out_dir``; returns
    the manifest's ``quantization`` record."""
    from safetensors.torch import load_file, save_file

    src, out = Path(src_dir), Path(out_dir)
    stored: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        stored.update(load_file(str(f)))
    g = int(plan["group_size"])
    tensors = plan_tensors(model, stored, plan["precisions"], g)
    out.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "generation_config.json"):
        if (src / f).is_file():
            shutil.copy(src / f, out / f)
    save_file(tensors, str(out / "model.safetensors"),
              metadata={"format": WO_FORMAT, "format_version": WO_FORMAT_VERSION, "group_size": str(g),
                        "method": plan["mode"]})
    (out / PLAN_FILE).write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")
    c = counts(plan["precisions"])
    return {"format": WO_FORMAT, "format_version": WO_FORMAT_VERSION, "method": plan["mode"],
            "group_size": g, "int4_method": "rtn", "int8": "symmetric per output channel",
            "counts": c, "plan": PLAN_FILE, "promoted": plan.get("promoted", []),
            "lm_head": plan["precisions"].get("lm_head", "fp32"), "drift_calibration": plan["drift"],
            "drift_all_int4": plan.get("drift_all_int4")}


def validate(q_dir: str | Path, probe: LogitsProbe, budget: Budget = VALIDATION_BUDGET) -> Drift:
    """Load the written checkpoint through the runtime loader and check its logits against the
    fp32 reference the probe holds; raises naming the metric and value on a miss."""
    d = probe.drift(load_weight_only(q_dir, encoder_decoder=probe.encoder_decoder))
    bad = budget.violations(d, "LLM validation (held-out)")
    if bad:
        raise WeightOnlyError("; ".join(bad), hint="use --llm-quant int8, or calibrate on your own domain "
                                                    "(--calib DIR)")
    return d
