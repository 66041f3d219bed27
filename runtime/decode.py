"""The decode loop both LLM engines share: the engine protocol, the static KV cache, sampling,
greedy/sampled ``generate`` and ``beam_search``. Model-agnostic: it knows an engine only through
``DecoderEngine``.

Array-agnostic: the torch and cuda engines return torch logits, the ort engine numpy ones, and
``generate`` samples in the kind it gets, so the ort engine answers without importing torch
(a seeded draw then comes from numpy's PCG64, not torch's generator: the same seed gives
another sample on the ort engine than on the torch engine, whose logits differ anyway).
``beam_search`` keeps its bookkeeping in torch, imported when it runs.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .errors import InputError


class CacheShape(Protocol):
    """What the KV cache needs of a model's shape (``llama.LlamaArgs`` has it)."""
    n_layers: int
    n_kv_heads: int
    max_positions: int

    @property
    def hd(self) -> int: ...


class DecoderEngine(Protocol):
    """A decoder-only LLM on a static KV cache: ``llama.FastLlama`` (engine "torch") and
    ``ortllm.OrtLlama`` (engine "ort"). ``model(inputs_embeds [B, T, D], start)`` returns the
    last position's logits [B, V], filling the cache at positions start..start+T-1."""
    engine: str
    embed: Any            # token ids -> inputs_embeds rows, ``.weight`` [V, D]: nn.Embedding or NumpyEmbedding

    def __call__(self, x, start: int): ...

    def setup_cache(self, max_len: int, batch: int = 1) -> None: ...

    def expand_cache(self, batch: int) -> None: ...

    def reorder_cache(self, rows, filled: int) -> None: ...

    def weight_bytes_per_token(self) -> int: ...


def as_numpy(x) -> np.ndarray:
    """A numpy array (as is) or a torch tensor (bf16 widened to fp32) as a numpy array, no copy
    where the memory allows."""
    if isinstance(x, np.ndarray):
        return x
    x = x.detach().cpu()
    return (x.float() if str(x.dtype) == "torch.bfloat16" else x).numpy()


class NumpyEmbedding:
    """nn.Embedding's two uses here, on a numpy table: ``weight[id]`` rows and ``embed(ids)``."""

    def __init__(self, weight):
        self.weight = np.ascontiguousarray(as_numpy(weight), dtype=np.float32)

    def __call__(self, ids) -> np.ndarray:
        return self.weight[as_numpy(ids)]


class StaticKVCache:
    """Per-layer K/V buffers [batch, kv_heads, max_len, head_dim] (fp32), shared by the engines:
    the torch engine writes its torch buffers itself, the ONNX Runtime engine binds its numpy
    buffers as past and present (it overrides ``_zeros``, ``expand_cache`` and ``reorder_cache``)."""
    a: CacheShape
    k_cache: list
    v_cache: list
    max_len: int

    def _no_cache(self) -> None:
        self.k_cache, self.v_cache, self.max_len = [], [], 0

    # what an engine's cache is made of: the CPU engines keep fp32 on the host; the cuda engine
    # bf16 in device memory, lengths rounded up so one captured graph serves many prompts
    cache_dtype = None    # torch dtype; None: torch.float32
    cache_quantum = 1

    @property
    def cache_device(self):
        return "cpu"

    def _zeros(self, shape):
        import torch

        return torch.zeros(shape, dtype=self.cache_dtype or torch.float32, device=self.cache_device)

    def _new_cache(self, max_len: int) -> None:
        """Hook: called before a new cache of ``max_len`` positions replaces the old one."""

    def setup_cache(self, max_len: int, batch: int = 1) -> None:
        a = self.a
        if max_len > a.max_positions:
            raise InputError(f"prompt + new tokens ({max_len}) exceed the LLM's {a.max_positions} positions")
        if self.k_cache and self.max_len >= max_len and self.k_cache[0].shape[0] == batch:
            return
        max_len = min(a.max_positions, -(-max_len // self.cache_quantum) * self.cache_quantum)
        self._new_cache(max_len)
        shape = (batch, a.n_kv_heads, max_len, a.hd)
        self.k_cache = [self._zeros(shape) for _ in range(a.n_layers)]
        self.v_cache = [self._zeros(shape) for _ in range(a.n_layers)]
        self.max_len = max_len

    def expand_cache(self, batch: int) -> None:
        """Copy a batch-1 cache (after a prefill) to ``batch`` rows, e.g. one per beam."""
        self.k_cache = [kc.expand(batch, -1, -1, -1).contiguous() for kc in self.k_cache]
        self.v_cache = [vc.expand(batch, -1, -1, -1).contiguous() for vc in self.v_cache]

    def reorder_cache(self, rows, filled: int) -> None:
        """Row i of every cache becomes old row ``rows[i]`` (beam search's survivors), for the
        first ``filled`` positions (the rest is unwritten); nothing to do when no beam moved."""
        import torch

        if torch.equal(rows, torch.arange(len(rows))):
            return
        for kc, vc in zip(self.k_cache, self.v_cache):
            kc[:, :, :filled] = kc[:, :, :filled].index_select(0, rows)
            vc[:, :, :filled] = vc[:, :, :filled].index_select(0, rows)


def sample(logits, temperature: float, top_p: float, generator) -> int:
    """Greedy when temperature == 0 and top_p == 1; otherwise transformers' temperature then
    top-p (nucleus) warping, then one multinomial draw. logits: [V] (batch 1), torch (with a
    torch.Generator or None) or numpy (``sample_numpy``)."""
    if isinstance(logits, np.ndarray):
        return sample_numpy(logits, temperature, top_p, generator)
    import torch

    if temperature <= 0 and top_p >= 1.0:
        return int(torch.argmax(logits))
    if generator is not None and logits.device != generator.device:
        logits = logits.cpu()  # a seeded draw is made where its generator lives (the cuda engine: the host)
    logits = logits.float() / (temperature if temperature > 0 else 1.0)
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= (1 - top_p)
        remove[-1] = False
        logits = logits.masked_fill(remove.scatter(0, idx, remove), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def sample_numpy(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator | None) -> int:
    """``sample`` on numpy logits: the same greedy choice (first maximum), the same warping
    (temperature, then top-p keeping the smallest set whose probability exceeds top_p), one draw
    from ``rng`` (numpy's default generator when None)."""
    if temperature <= 0 and top_p >= 1.0:
        return int(np.argmax(logits))
    x = logits.astype(np.float32) / np.float32(temperature if temperature > 0 else 1.0)
    if top_p < 1.0:
        idx = np.argsort(x, kind="stable")
        p = _softmax(x[idx])
        remove = np.cumsum(p) <= (1 - top_p)
        remove[-1] = False
        x[idx[remove]] = -np.inf
    p = _softmax(x).astype(np.float64)
    return int((rng or np.random.default_rng()).choice(len(p), p=p / p.sum()))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def generate(model: DecoderEngine, inputs_embeds, *, max_new_tokens: int, eos_ids=(),
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, on_token=None,
             min_new_tokens: int = 0) -> list[int]:
    """Prefill on inputs_embeds [1, T, D], then decode one token per forward call; stops after
    an EOS id (included, as transformers does) or max_new_tokens. As transformers'
    ``min_new_tokens``, the EOS ids cannot be chosen before ``min_new_tokens`` tokens (the
    benchmark forces every answer to its full length this way)."""
    if inputs_embeds.shape[0] != 1:
        raise InputError("the fast LLM runtime generates for batch size 1")
    t = inputs_embeds.shape[1]
    model.setup_cache(t + max_new_tokens)
    eos = set(eos_ids)
    x = inputs_embeds.astype(np.float32, copy=False) if isinstance(inputs_embeds, np.ndarray) else inputs_embeds.float()
    logits = model(x, 0)[0]
    gen = None
    if seed is not None and isinstance(logits, np.ndarray):
        gen = np.random.default_rng(seed)
    elif seed is not None:
        import torch

        gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    pos = t
    suppress = sorted(eos) if eos and min_new_tokens > 0 else None
    while True:
        if suppress is not None and len(out) < min_new_tokens:
            logits = logits.copy() if isinstance(logits, np.ndarray) else logits.clone()
            logits[suppress] = float("-inf")
        tok = sample(logits, temperature, top_p, gen)
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        if tok in eos or len(out) >= max_new_tokens:
            return out
        logits = model(model.embed.weight[tok].reshape(1, 1, -1), pos)[0]
        pos += 1


def beam_search(model: DecoderEngine, inputs_embeds, *, num_beams: int, max_new_tokens: int,
                eos_ids=(), length_penalty: float = 1.0, early_stopping: bool | str = False,
                on_prefill=None) -> list[int]:
    """transformers' beam search (its vectorized v5 algorithm, batch 1; defaults as transformers':
    length_penalty 1.0, early_stopping False) on the static KV cache: one prefill, the cache
    copied to ``num_beams`` rows, then one batched decode step per token with the cache rows
    reordered to the surviving beams. Returns the best finished hypothesis' new tokens (its EOS
    included, as transformers returns it)."""
    import torch

    with torch.no_grad():
        return _beam_search(model, torch.as_tensor(inputs_embeds), num_beams=num_beams,
                            max_new_tokens=max_new_tokens, eos_ids=eos_ids, length_penalty=length_penalty,
                            early_stopping=early_stopping, on_prefill=on_prefill)


def _host_logits(logits):
    import torch

    return torch.from_numpy(logits) if isinstance(logits, np.ndarray) else logits.cpu()


def _beam_search(model, inputs_embeds, *, num_beams, max_new_tokens, eos_ids, length_penalty, early_stopping,
                 on_prefill) -> list[int]:
    import torch
    import torch.nn.functional as F

    if inputs_embeds.shape[0] != 1:
        raise InputError("the fast LLM runtime generates for batch size 1")
    t = inputs_embeds.shape[1]
    model.setup_cache(t + max_new_tokens, batch=1)
    logits = _host_logits(model(inputs_embeds.float(), 0))   # [1, V]; beam bookkeeping runs on the host
    if on_prefill is not None:
        on_prefill()
    model.expand_cache(num_beams)
    vocab = logits.shape[-1]
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long)
    keep = max(2, 1 + len(eos)) * num_beams              # candidates kept per step, as transformers
    top_mask = torch.arange(keep) < num_beams
    running = torch.zeros(num_beams, max_new_tokens, dtype=torch.long)
    running_scores = torch.full((num_beams,), -1.0e9)
    running_scores[0] = 0.0                              # all beams start equal: only the first counts
    finished = running.clone()
    finished_scores = torch.full((num_beams,), -1.0e9)
    finished_len = torch.zeros(num_beams, dtype=torch.long)
    finished_done = torch.zeros(num_beams, dtype=torch.bool)
    improvable = True
    logits = logits.expand(num_beams, -1)
    cur = 0
    while True:
        acc = (F.log_softmax(logits.float(), dim=-1) + running_scores[:, None]).reshape(-1)
        top_lp, top_idx = torch.topk(acc, keep)
        src, tok = top_idx // vocab, top_idx % vocab
        cand = running[src]                              # advanced indexing: a copy
        cand[:, cur] = tok
        hits = torch.isin(tok, eos) | (cur + 1 >= max_new_tokens)
        # the best num_beams unfinished candidates continue
        run_lp = top_lp + hits.float() * -1.0e9
        nxt = torch.topk(run_lp, num_beams).indices
        running, running_scores, rows = cand[nxt], run_lp[nxt], src[nxt]
        # candidates among the top num_beams that just finished compete for the finished slots
        just = hits & top_mask
        score = top_lp / ((cur + 1) ** length_penalty)
        if early_stopping is True and bool(finished_done.all()):
            score = score - 1.0e9
        if not improvable:
            score = score - 1.0e9
        score = score + (~just).float() * -1.0e9
        merged = torch.topk(torch.cat([finished_scores, score]), num_beams).indices
        finished = torch.cat([finished, cand])[merged]
        finished_scores = torch.cat([finished_scores, score])[merged]
        finished_len = torch.cat([finished_len, torch.full((keep,), cur + 1)])[merged]
        finished_done = torch.cat([finished_done, just])[merged]
        cur += 1
        best_len = max_new_tokens if (early_stopping == "never" and length_penalty > 0.0) else cur
        best_running = running_scores[0] / (best_len ** length_penalty)
        worst_finished = torch.where(finished_done, finished_scores.min(), torch.tensor(-1.0e9))
        improvable = improvable and bool((best_running > worst_finished).any())
        open_beam = not (bool(finished_done.all()) and early_stopping is True)
        if not (improvable and open_beam and not bool(hits.all())):
            break
        model.reorder_cache(rows, t + cur - 1)
        logits = _host_logits(model(model.embed(running[:, cur - 1]).reshape(num_beams, 1, -1), t + cur - 1))
    return [int(x) for x in finished[0, :int(finished_len[0])]]
