"""The seeded multi-passage QA set: what the blending quality measurements rely on."""

from __future__ import annotations

from kvtier.quality.qa import make_qa_set


def test_the_set_is_deterministic_and_large_enough() -> None:
    a, b = make_qa_set(seed=3), make_qa_set(seed=3)
    assert [q.text for q in a.questions] == [q.text for q in b.questions]
    assert a.contexts[0].passages == b.contexts[0].passages
    assert make_qa_set(seed=4).contexts[0].passages != a.contexts[0].passages
    assert len(a.questions) >= 200 and sum(q.kind == "two-hop" for q in a.questions) == len(a.contexts)


def test_each_answer_is_in_its_passage_never_served_first_and_has_a_distractor() -> None:
    qa = make_qa_set(contexts=10)
    for context in qa.contexts:
        assert len(context.passages) == 6
        for q in context.questions:
            assert q.answer in context.passages[q.passage]
            assert q.order[0] != q.passage and sorted(q.order) == list(range(6))
        for shape in ("The codename of Project", "was born in", "The access code for vault", "is captained by"):
            assert sum(shape in p for p in context.passages) >= 2, shape  # the fact and a look-alike elsewhere


def test_orders_differ_so_passages_move() -> None:
    qa = make_qa_set(contexts=10)
    orders = {q.order for q in qa.questions}
    assert len(orders) > 10
