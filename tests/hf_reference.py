"""transformers as the tests' reference: its generate() on one unpadded prompt."""

from __future__ import annotations

import torch


def hf_generate(model, ids: list[int], **settings) -> torch.Tensor:
    """`model.generate` (a transformers model) on one prompt without padding, pad id 0, no grad:
    prompt and new tokens [1, len(ids) + new]."""
    with torch.no_grad():
        return model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=0, **settings
        )
