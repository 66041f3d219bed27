"""Weight-only INT8 and mixed 4/8-bit LLMs for any family (T5, OPT, Llama), the precision of
each linear chosen by measured logits drift.

Search apart from apply (llm-awq style):

- ``sensitivities``: each search unit alone in int4 (RTN, ``quant.int4.quantize_rtn``) on the
  real CPU kernel, everything else fp32; the drift of the LLM's logits against fp32 on
  calibration tokens. A unit is one ``nn.Linear`` (lm_head included), or on big models one
  transformer block's linears together (``units``): one teacher-forced fp32 forward per unit
  took 13-17 s at Flan-T5-XL on 2 AMD Zen 4 cores, so per linear (433) is ~95-125 min; per
  block (49) the pass took ~19 min there, under load.
- ``search_plan``: start all-int4, promote the most sensitive units to int8 one at a time
  (then to fp32, only if all-int8 is not enough) until the search budget holds. The result is
  a small JSON plan {linear: "int4"|"int8"|"fp32"} plus the sensitivities and the drift achieved.
- ``plan_tensors`` / ``save_weight_only``: apply a plan deterministically and write the
  ``ib-edge-weight-only`` checkpoint (``runtime.lowbit`` documents the layout and loads it).

The drift is measured by ``quant.logits_probe.LogitsProbe`` (the one place that knows model
families) against the LLM logits budgets of ``quant.budgets``.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from ib_edge.runtime.errors import IbEdgeError
from ib_edge.runtime.formats import WO_FORMAT, WO_FORMAT_VERSION
from ib_edge.runtime.lowbit import LINEAR_PRECISIONS, HFInt4Linear, Int8Linear, load_weight_only

from .budgets import SEARCH_BUDGET, VALIDATION_BUDGET, LogitsBudget
from .drift import LogitsDrift
from .int4 import quantize_rtn
from .logits_probe import LogitsProbe

PLAN_FORMAT = "ib-edge-weight-only-plan"
PLAN_FILE = "quant_plan.json"
MODES = ("int8", "mixed")
SEARCH_UNITS = ("auto", "linear", "block")
# --llm-search auto: per linear when that pass is measured to take at most this long, else per block
AUTO_LINEAR_PASS_S = 600.0


class WeightOnlyError(IbEdgeError):
    pass


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
        if precision not in LINEAR_PRECISIONS:
            raise WeightOnlyError(f"precision {precision!r} is not one of {', '.join(LINEAR_PRECISIONS)}")
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


# --- search ------------------------------------------------------------------------------------
def unit_of(name: str, granularity: str) -> str:
    """The search unit of linear ``name``: itself ("linear"), or ("block") its path up to the
    first numeric component, i.e. its transformer block (``encoder.block.3``, ``model.layers.7``);
    a linear outside any block (lm_head) is its own unit."""
    if granularity == "linear":
        return name
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i + 1])
    return name


def units(names: list[str], granularity: str) -> dict[str, list[str]]:
    """Search units in module order: {unit: [its linears]}."""
    if granularity not in SEARCH_UNITS[1:]:
        raise WeightOnlyError(f"search unit {granularity!r} is not one of {', '.join(SEARCH_UNITS[1:])}")
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(unit_of(n, granularity), []).append(n)
    return out


def _int4_linears(swapper: Swapper, linears: list[str]) -> list[str]:
    return [n for n in linears if int4_supported(swapper.fp32[n], swapper.group_size)]


def sensitivities(swapper: Swapper, measure, log=lambda m: None, granularity: str = "linear") -> list[dict]:
    """Each unit's int4-capable linears alone in int4 (the rest fp32): its drift, most
    sensitive first. Units with no linear the group size divides (in_features) cannot be int4
    and are listed as such."""
    out = []
    swapper.restore()
    groups = units(list(swapper.fp32), granularity)
    total, t0, said = len(groups), time.perf_counter(), 0.0
    for i, (unit, linears) in enumerate(groups.items(), 1):
        four = _int4_linears(swapper, linears)
        rec = {"name": unit} if granularity == "linear" else {"name": unit, "linears": len(linears),
                                                              "int4_linears": len(four)}
        if not four:
            out.append({**rec, "int4": False})
            continue
        swapper.apply({n: "int4" for n in four})
        d = measure()
        swapper.apply({n: "fp32" for n in four})
        out.append({**rec, "int4": True, **d.to_json()})
        spent = time.perf_counter() - t0
        if spent - said >= 60 or (i == 1 and total > 20):   # progress on long searches (minutes per model)
            said = spent
            log(f"      int4 sensitivity: {i}/{total} {'linears' if granularity == 'linear' else 'blocks'} in "
                f"{spent:.0f} s (~{spent / i * (total - i) / 60:.0f} min left for this pass)")
    out.sort(key=lambda r: (not r["int4"], r.get("logits_cosine_mean", 0), r.get("top1_agreement", 0)))
    for r in out[:5]:
        if r["int4"]:
            log(f"      int4 sensitivity {r['name']}: cosine {r['logits_cosine_mean']:.5f}, "
                f"top-1 {r['top1_agreement']:.4f}")
    return out


def search_plan(swapper: Swapper, measure, budget: LogitsBudget = SEARCH_BUDGET, log=lambda m: None,
                granularity: str = "linear") -> dict:
    """All-int4 first, then promote units in sensitivity order to int8, then (only if all-int8
    misses the budget) to fp32, measuring after each promotion, until ``budget`` holds."""
    sens = sensitivities(swapper, measure, log, granularity)
    groups = units(list(swapper.fp32), granularity)
    four = {n for linears in groups.values() for n in _int4_linears(swapper, linears)}
    plan = {n: "int4" if n in four else "int8" for n in swapper.fp32}
    swapper.apply(plan)
    start = d = measure()
    promoted = []
    for target in ("int8", "fp32"):
        for r in sens:
            if not budget.violations(d, ""):
                break
            up = [n for n in groups[r["name"]]
                  if LINEAR_PRECISIONS.index(plan[n]) < LINEAR_PRECISIONS.index(target)]
            if up:
                plan.update({n: target for n in up})
                swapper.apply({n: target for n in up})
                d = measure()
                promoted.append({"name": r["name"], "to": target, **d.to_json()})
                if len(promoted) % 10 == 0:
                    log(f"      promoted {len(promoted)} {'linears' if granularity == 'linear' else 'blocks'}: "
                        f"logits cosine {d.cosine_mean:.5f}, decided top-1 {d.top1_decided:.4f}")
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


def choose_granularity(n_linears: int, n_blocks: int, seconds_per_measure: float | None,
                       asked: str = "auto") -> tuple[str, str]:
    """(unit, why) for ``--llm-search``: "auto" searches per linear when that pass (one measured
    forward per linear) takes at most ``AUTO_LINEAR_PASS_S``, else per block."""
    if asked not in SEARCH_UNITS:
        raise WeightOnlyError(f"--llm-search {asked!r} is not one of {', '.join(SEARCH_UNITS)}")
    if asked != "auto":
        return asked, f"asked (--llm-search {asked})"
    est = n_linears * seconds_per_measure
    if est <= AUTO_LINEAR_PASS_S:
        return "linear", (f"{n_linears} linears x {seconds_per_measure:.2f} s per measured forward = "
                          f"~{est / 60:.1f} min <= {AUTO_LINEAR_PASS_S / 60:.0f} min")
    return "block", (f"{n_linears} linears x {seconds_per_measure:.2f} s per measured forward = ~{est / 60:.0f} min "
                     f"> {AUTO_LINEAR_PASS_S / 60:.0f} min; {n_blocks} blocks instead")


def make_plan(model: nn.Module, probe: LogitsProbe, mode: str, group_size: int, log=lambda m: None,
              search: str = "auto") -> dict:
    """The plan record for ``mode`` ("int8": every linear int8; "mixed": searched, per linear or
    per block as ``search`` says or ``choose_granularity`` decides)."""
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
        per = None
        if search == "auto":
            t0 = time.perf_counter()
            measure()                               # fp32 against itself: times one measured forward
            per = time.perf_counter() - t0
        unit, why = choose_granularity(len(names), len(units(names, "block")), per, search)
        log(f"      mixed search per {unit}: {why}")
        rec = search_plan(sw, measure, SEARCH_BUDGET, log, unit)
        rec["search"] = {"unit": unit, "why": why, "seconds_per_measure": per and round(per, 3)}
    return {"format": PLAN_FORMAT, "version": 1, "mode": mode, "group_size": group_size,
            "calibration_tokens": probe.tokens, **rec}


def counts(precisions: dict[str, str]) -> dict[str, int]:
    return {p: sum(1 for v in precisions.values() if v == p) for p in LINEAR_PRECISIONS}


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
            bad = {v for v in plan.get("precisions", {}).values()} - set(LINEAR_PRECISIONS)
            if bad or not plan.get("precisions"):
                raise WeightOnlyError(f"{cand}: precisions must be {', '.join(LINEAR_PRECISIONS)}")
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
    replaced = {f"{n}.weight" for n, p in precisions.items() if p != "fp32"}
    out = {k: (t.float() if t.is_floating_point() else t).contiguous() for k, t in stored.items()
           if k not in replaced}    # no fp32 copy of a weight that is about to be quantized (11 GB at T5-XL)
    for name, prec in precisions.items():
        lin = model.get_submodule(name)
        if prec == "fp32":
            continue
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
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, out = Path(src_dir), Path(out_dir)
    # only what stays as stored (embeddings, norms, fp32 linears): the quantized weights come from
    # ``model``, so the stored copies of those are never read (5.7 GB bf16 at T5-XL)
    replaced = {f"{n}.weight" for n, p in plan["precisions"].items() if p != "fp32"}
    stored: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            stored.update({k: fh.get_tensor(k) for k in fh.keys() if k not in replaced})
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


def validate(q_dir: str | Path, probe: LogitsProbe, budget: LogitsBudget = VALIDATION_BUDGET) -> LogitsDrift:
    """Load the written checkpoint through the runtime loader and check its logits against the
    fp32 reference the probe holds; raises naming the metric and value on a miss."""
    d = probe.drift(load_weight_only(q_dir, encoder_decoder=probe.encoder_decoder))
    bad = budget.violations(d, "LLM validation (held-out)")
    if bad:
        raise WeightOnlyError("; ".join(bad), hint="use --llm-quant int8, or calibrate on your own domain "
                                                    "(--calib DIR)")
    return d
