"""The LLM logits probe: fp32 reference logits on what the LLM sees, and the drift of any variant.

The one place in quant/ that knows model families: it feeds what the LLM really sees (query
embeddings in the prompt's <image> slots, then the instruction) and teacher-forces the fp32
model's own greedy answer, so every probed token is a decision the model makes at inference
(encoder-decoder: the decoder's positions; decoder-only: the last prompt position and the
answer's). Used by the weight-only search and validation (``quant.weight_only``) and by the
export-time validation of 4-bit Llama bundles (``drift_stepwise``, through the runtime's engines).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ib_edge.runtime.decode import DecoderEngine
from ib_edge.runtime.errors import IbEdgeError
from ib_edge.runtime.llm import splice_image

from .drift import LogitsDrift, drift_of


class ProbeError(IbEdgeError):
    pass


class LogitsProbe:
    """fp32 reference logits on what the LLM sees, and the drift of any variant of the model.

    ``examples``: objects with ``input_ids`` [T] (the prompt, <image> slots included) and
    ``query_embeds`` [Q, D] (``quant.llm_quant.Example``). Examples run in right-padded batches
    of ``batch`` (causal decoders never see the padding; the encoder masks it), so one drift
    measurement is a few forward passes."""

    def __init__(self, model: nn.Module, examples, image_token_id: int, max_new_tokens: int = 16, batch: int = 16):
        if not examples:
            raise ProbeError("no calibration examples for the LLM drift probe")
        self.encoder_decoder = bool(model.config.is_encoder_decoder)
        embeds = []
        with torch.no_grad():
            for e in examples:
                ids = torch.from_numpy(np.asarray(e.input_ids, dtype=np.int64))[None]
                emb = model.get_input_embeddings()(ids)
                if e.query_embeds is not None:
                    emb = splice_image(emb, ids, e.query_embeds, image_token_id)
                embeds.append(emb[0])
            answers = self._greedy(model, embeds, max_new_tokens, batch)
        # (prompt embeds [T, D], ids fed to produce the answer positions); encoder-decoder: the
        # answer is [start, a1..an] and the decoder is fed [start, a1..a(n-1)]; decoder-only: it is
        # [a1..an], the prompt's last position predicts a1, then a1..a(n-1) are fed
        rows = [(e, a[:-1]) for e, a in zip(embeds, answers) if len(a) > (1 if self.encoder_decoder else 0)]
        if not rows:
            raise ProbeError("the fp32 LLM generated nothing on the calibration examples")
        self.batches = [self._batch(model, rows[i:i + batch]) for i in range(0, len(rows), batch)]
        self.reference = [self._logits(model, b) for b in self.batches]
        self.tokens = sum(r.shape[0] for r in self.reference)

    def _greedy(self, model, embeds, max_new_tokens: int, batch: int) -> list[torch.Tensor]:
        """fp32 greedy answers: decoder-only one prompt at a time (no left-padding subtleties),
        except a layer-streamed model; encoder-decoders and streamed models in padded batches."""
        if not self.encoder_decoder and not getattr(model, "ib_edge_streamed", False):
            return [model.generate(inputs_embeds=e[None], attention_mask=torch.ones(1, e.shape[0], dtype=torch.long),
                                   max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)[0] for e in embeds]
        return self._greedy_batched(model, embeds, max_new_tokens, batch, left=not self.encoder_decoder)

    @staticmethod
    def _greedy_batched(model, embeds, max_new_tokens: int, batch: int, left: bool) -> list[torch.Tensor]:
        """Greedy answers in padded batches: encoder-decoders right-padded (the encoder masks the
        padding; each row starts with the decoder start token), decoder-only left-padded for a
        layer-streamed model (``quant.streamed``: every forward re-reads the weights, so one
        prompt at a time would read them prompts x tokens times; positions come from the mask, so
        each row sees what it would alone). A row's answer ends at its first EOS, as ``generate``
        ends it alone."""
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        first = 0 if left else 1   # an encoder-decoder row's first id is the decoder start token
        out = []
        for i in range(0, len(embeds), batch):
            chunk = embeds[i:i + batch]
            t = max(e.shape[0] for e in chunk)
            emb, attn = torch.zeros(len(chunk), t, chunk[0].shape[-1]), torch.zeros(len(chunk), t, dtype=torch.long)
            for j, e in enumerate(chunk):
                rows = slice(t - e.shape[0], t) if left else slice(0, e.shape[0])
                emb[j, rows], attn[j, rows] = e, 1
            gen = model.generate(inputs_embeds=emb, attention_mask=attn, max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1)
            for row in gen:
                stop = next((k + 1 for k in range(first, len(row)) if int(row[k]) in eos), len(row))
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
    def drift(self, model: nn.Module) -> LogitsDrift:
        return drift_of([self._logits(model, b) for b in self.batches], self.reference)

    @torch.no_grad()
    def drift_stepwise(self, model: DecoderEngine) -> LogitsDrift:
        """Drift of a decoder-only model that returns last-position logits from a static KV
        cache (the fast runtime's engines, ``model(x, start)``), run as it generates: each row
        prefilled up to its prompt's last position, then teacher-forced one token at a time."""
        if self.encoder_decoder:
            raise ProbeError("stepwise drift is for decoder-only LLMs")
        got = []
        for b in self.batches:
            out = []
            for i in dict.fromkeys(r for r, _ in b["select"]):      # rows in order
                cols = [c for r, c in b["select"] if r == i]        # consecutive positions
                first, last = cols[0], cols[-1]
                x = b["inputs_embeds"][i:i + 1, :last + 1]
                model.setup_cache(last + 1)
                out.append(torch.as_tensor(model(x[:, :first + 1], 0)).float())   # the ort engine: numpy
                out += [torch.as_tensor(model(x[:, p:p + 1], p)).float() for p in range(first + 1, last + 1)]
            got.append(torch.cat(out))
        return drift_of(got, self.reference)
