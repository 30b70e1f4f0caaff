"""How close an answer, or a whole next-token distribution, is to the reference.

Answers are scored as in SQuAD (and CacheBlend's evaluation): lowercase, punctuation and the articles a/an/the
removed, whitespace collapsed; exact match, and F1 over the words. A 135M model answers badly in absolute terms,
so the distributions matter more: the mean log-probability of the gold answer's tokens, and the KL divergence of
the first generated token's distribution from full recompute's.
"""

from __future__ import annotations

import re
import string
from collections import Counter

import torch

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's normalisation of an answer."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def first_line(text: str) -> str:
    """The answer part of a generation: its first non-empty line."""
    return next((line for line in text.strip().splitlines() if line.strip()), "")


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize(prediction) == normalize(gold))


def token_f1(prediction: str, gold: str) -> float:
    """F1 over the normalised words of ``prediction`` and ``gold`` (1.0 when both are empty)."""
    predicted, wanted = normalize(prediction).split(), normalize(gold).split()
    if not predicted or not wanted:
        return float(predicted == wanted)
    common = sum((Counter(predicted) & Counter(wanted)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(reference || other) of the next-token distributions given by two logit vectors, in nats."""
    p = torch.log_softmax(reference_logits.double(), dim=-1)
    q = torch.log_softmax(logits.double(), dim=-1)
    return float((p.exp() * (p - q)).sum())


def mean_log_prob(first_logits: torch.Tensor, next_logits: torch.Tensor, answer: list[int]) -> float:
    """Mean log-probability of ``answer``'s tokens: the first from ``first_logits`` (the prompt's last position),
    each next one from ``next_logits[i]`` (the position of answer token ``i``)."""
    logits = torch.cat([first_logits.view(1, -1), next_logits[: len(answer) - 1]]).double()
    chosen = torch.log_softmax(logits, dim=-1)[torch.arange(len(answer)), torch.tensor(answer)]
    return float(chosen.mean())
