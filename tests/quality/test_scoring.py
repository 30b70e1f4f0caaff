"""Scores: SQuAD-normalised exact match and F1, KL divergence, gold log-probability."""

from __future__ import annotations

import math

import torch

from kvtier.quality.scoring import exact_match, first_line, kl_divergence, mean_log_prob, normalize, token_f1


def test_squad_normalisation_and_scores() -> None:
    assert normalize("The  Blue-fin!") == "bluefin"
    assert exact_match("the BlueFin.", "Bluefin") == 1.0 and exact_match("Bluefin shark", "Bluefin") == 0.0
    assert token_f1("Velmora Arbel", "Arbel Velmora") == 1.0
    assert math.isclose(token_f1("Velmora", "Velmora Arbel"), 2 / 3)
    assert token_f1("nothing", "Velmora") == 0.0 and token_f1("", "") == 1.0
    assert first_line("\n  4812\nQuestion: more") == "4812"


def test_kl_is_zero_for_the_same_distribution_and_positive_otherwise() -> None:
    logits = torch.randn(100)
    assert abs(kl_divergence(logits, logits)) < 1e-12
    assert kl_divergence(logits, logits + torch.randn(100)) > 0


def test_mean_log_prob_of_the_gold_tokens() -> None:
    first = torch.tensor([0.0, 10.0, 0.0])  # token 1 almost surely
    then = torch.tensor([[0.0, 0.0, 10.0], [5.0, 5.0, 5.0]])  # then token 2 almost surely
    assert mean_log_prob(first, then, [1, 2]) > -1e-3
    assert math.isclose(mean_log_prob(first, then, [1]), float(torch.log_softmax(first.double(), 0)[1]))
