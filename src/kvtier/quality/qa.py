"""A seeded multi-passage QA set: invented entities and facts spread over passages that are cached separately.

No QA data set ships offline here, and a real one would test what the model remembers rather than what it
reads. Every name here is invented from syllables, so a model can answer only from the passages. Each context
holds ``passages`` passages of filler prose with facts planted in them; its questions ask for a fact whose passage
is never served first (prefix caching alone cannot reuse it), with look-alike distractors in other passages (the
same sentence about another entity, and one about an entity whose name differs by one letter), a two-hop variant
whose answer needs two passages, and each question served with its passages in an order of its own, so cached
passages are reused away from the positions they were computed at.

Deterministic: the same seed gives the same set on every machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

SYLLABLES = ["ka", "mor", "vel", "tri", "os", "lan", "dru", "fe", "ni", "zar", "qui", "bel", "tor", "ash", "ren", "ul"]
CITY_ENDINGS = ["ton", "mere", "ford", "holm", "vale", "wick"]
COLOURS = ["Blue", "Red", "Amber", "Silver", "Green", "Black", "Golden", "Violet"]
ANIMALS = ["fin", "hawk", "fox", "wolf", "moth", "crane", "otter", "lynx"]
JOBS = ["baker", "pilot", "glassblower", "surveyor", "beekeeper", "clockmaker", "ferryman", "cartographer"]
FILLER_SUBJECTS = [
    "The valley",
    "The old road",
    "The harbour",
    "The market",
    "The library",
    "The orchard",
    "The bridge",
]
FILLER_VERBS = ["was rebuilt", "was crowded", "grew quiet", "was repainted", "flooded", "was expanded", "stood empty"]
FILLER_TIMES = ["after the long winter", "during the fair", "in the dry season", "before the census", "each spring"]
FILLER_EXTRAS = [
    "Travellers often stopped there to rest.",
    "Nobody remembers who first planted the hedges.",
    "The records of that year are incomplete.",
    "Merchants argued about the price of salt.",
    "Children counted the boats at dusk.",
]


@dataclass(frozen=True, slots=True)
class Question:
    """One question about a context: served with its passages in ``order`` (indices into the context's)."""

    context: int
    text: str
    answer: str
    passage: int  # where the answer is (index into the context's passages)
    order: tuple[int, ...]
    kind: str  # "single" or "two-hop"


@dataclass(slots=True)
class Context:
    passages: list[str]
    questions: list[Question] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class QASet:
    contexts: list[Context]

    @property
    def questions(self) -> list[Question]:
        return [q for c in self.contexts for q in c.questions]


class _Names:
    """Invented names, none used twice in a context."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def _fresh(self, make) -> str:  # type: ignore[no-untyped-def]
        while True:
            name = make()
            if name not in self.used:
                self.used.add(name)
                return name

    def word(self, syllables: int = 3) -> str:
        return self._fresh(lambda: "".join(self.rng.choice(SYLLABLES) for _ in range(syllables)).capitalize())

    def person(self) -> str:
        return self._fresh(lambda: f"{self.word(2)} {self.word(3)}")

    def city(self) -> str:
        return self._fresh(lambda: self.word(2) + self.rng.choice(CITY_ENDINGS))

    def codename(self) -> str:
        return self._fresh(lambda: self.rng.choice(COLOURS) + self.rng.choice(ANIMALS))

    def code(self) -> str:
        return self._fresh(lambda: str(self.rng.randrange(1000, 10000)))

    def look_alike(self, name: str) -> str:
        """``name`` with one letter changed (not the first): the hardest distractor to tell apart."""
        letters = "aeiourlnm"
        for _ in range(50):
            i = self.rng.randrange(1, len(name))
            if name[i].isalpha():
                other = name[:i] + self.rng.choice(letters.replace(name[i].lower(), "")) + name[i + 1 :]
                if other not in self.used:
                    self.used.add(other)
                    return other
        return self.word()


def _fact_kinds(names: _Names, rng: random.Random) -> list[tuple[str, str, str, str]]:
    """(fact sentence, distractor sentence, question, answer) of each single-hop template."""
    project, other_project = names.word(), names.word()
    person, other_person = names.person(), names.person()
    vault = names.word(2)
    ship, captain = names.word(), names.person()
    worker = names.person()
    codename, city, code, job = names.codename(), names.city(), names.code(), rng.choice(JOBS)
    return [
        (
            f"The codename of Project {project} is {codename}.",
            f"The codename of Project {names.look_alike(project)} is {names.codename()}.",
            f"What is the codename of Project {project}?",
            codename,
        ),
        (
            f"{person} was born in {city}.",
            f"{other_person} was born in {names.city()}.",
            f"Where was {person} born?",
            city,
        ),
        (
            f"The access code for vault {vault} is {code}.",
            f"The access code for vault {names.look_alike(vault)} is {names.code()}.",
            f"What is the access code for vault {vault}?",
            code,
        ),
        (
            f"The ship {ship} is captained by {captain}.",
            f"The ship {other_project} is captained by {names.person()}.",
            f"Who captains the ship {ship}?",
            captain,
        ),
        (
            f"{worker} works as a {job}.",
            f"{names.look_alike(worker)} works as a {rng.choice([j for j in JOBS if j != job])}.",
            f"What does {worker} work as?",
            job,
        ),
    ]


def _filler(rng: random.Random, sentences: int) -> list[str]:
    out = []
    for _ in range(sentences):
        if rng.random() < 0.3:
            out.append(rng.choice(FILLER_EXTRAS))
        else:
            out.append(f"{rng.choice(FILLER_SUBJECTS)} {rng.choice(FILLER_VERBS)} {rng.choice(FILLER_TIMES)}.")
    return out


def make_qa_set(
    *, contexts: int = 40, passages: int = 6, filler_sentences: int = 14, orderings: int = 3, seed: int = 0
) -> QASet:
    """``contexts`` contexts of ``passages`` passages, each with five single-hop questions and one two-hop
    question (``6 * contexts`` questions), each question with its own order of the passages, drawn from
    ``orderings`` per context, with the answer's passage never first."""
    if passages < 6:
        raise ValueError("a context needs at least 6 passages: five facts, none in the first")
    rng = random.Random(seed)
    made = []
    for index in range(contexts):
        names = _Names(rng)
        bodies = [_filler(rng, filler_sentences) for _ in range(passages)]
        facts = _fact_kinds(names, rng)
        where = rng.sample(range(1, passages), len(facts))  # never the first passage of the context
        questions: list[tuple[str, str, int, str]] = []
        for (fact, distractor, question, answer), home in zip(facts, where, strict=True):
            _plant(rng, bodies[home], fact)
            _plant(rng, bodies[rng.choice([p for p in range(passages) if p != home])], distractor)
            questions.append((question, answer, home, "single"))
        employee, manager, city = names.person(), names.person(), names.city()
        first, second = rng.sample(range(1, passages), 2)
        _plant(rng, bodies[first], f"The manager of {employee} is {manager}.")
        _plant(rng, bodies[second], f"{manager} works in the city of {city}.")
        questions.append((f"In which city does the manager of {employee} work?", city, second, "two-hop"))
        context = Context([" ".join(body) for body in bodies])
        orders = [_order(rng, passages) for _ in range(orderings)]
        for text, answer, home, kind in questions:
            candidates = [o for o in orders if o[0] != home]
            order = rng.choice(candidates) if candidates else _order(rng, passages, avoid_first=home)
            context.questions.append(Question(index, text, answer, home, order, kind))
        made.append(context)
    return QASet(made)


def _plant(rng: random.Random, body: list[str], sentence: str) -> None:
    body.insert(rng.randrange(len(body) + 1), sentence)


def _order(rng: random.Random, passages: int, avoid_first: int | None = None) -> tuple[int, ...]:
    """A random order of the passages, not starting with ``avoid_first``."""
    order = list(range(passages))
    rng.shuffle(order)
    if order[0] == avoid_first:
        order[0], order[-1] = order[-1], order[0]
    return tuple(order)
