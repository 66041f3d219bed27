"""Thin wrapper modules: each defines exactly one exported graph's inputs and outputs."""
from __future__ import annotations

import torch
from torch import nn


class VisionGraph(nn.Module):
    """pixel_values [B,3,H,W] -> image_embeds [B,P+1,Dv] (the ViT's last hidden state)."""

    def __init__(self, model):
        super().__init__()
        self.vision_model = model.vision_model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state


class QFormerGraph(nn.Module):
    """(image_embeds, qformer_input_ids, qformer_attention_mask) -> query_embeds [B,Q,D_llm].

    The instruction-aware part of InstructBLIP: the instruction tokens attend together with the
    learned queries, and only the query positions are projected into the LLM's space. Mirrors
    ``InstructBlipForConditionalGeneration.get_image_features`` step 2 and 3.
    """

    def __init__(self, model):
        super().__init__()
        self.qformer = model.qformer
        self.query_tokens = model.query_tokens
        self.language_projection = model.language_projection

    def forward(self, image_embeds, qformer_input_ids, qformer_attention_mask):
        batch = image_embeds.shape[0]
        num_q = self.query_tokens.shape[1]
        query_tokens = self.query_tokens.expand(batch, -1, -1)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        query_mask = torch.ones((batch, num_q), dtype=torch.long, device=image_embeds.device)
        attention_mask = torch.cat([query_mask, qformer_attention_mask.to(torch.long)], dim=1)
        out = self.qformer(
            input_ids=qformer_input_ids,
            attention_mask=attention_mask,
            query_embeds=query_tokens,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            return_dict=True,
        )
        return self.language_projection(out.last_hidden_state[:, :num_q, :])


WRAPPERS = {"vision": VisionGraph, "qformer": QFormerGraph}
