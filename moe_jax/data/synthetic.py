"""A small synthetic English corpus from a seeded grammar: learnable, generated in memory, no files.

Structure a model can learn, from easy to harder: a closed vocabulary and fixed sentence templates;
subject-verb number agreement ("the cat sees" / "the cats see"); arithmetic facts ("12 plus 7 is 19.");
counting runs ("counts 4 5 6 7"); and per-document context (each story has a hero and a place that
recur in its sentences, so attention over earlier tokens lowers the loss). The text depends only on
`CORPUS_SEED`, never on `DataConfig.seed`: the corpus is a fixed data set, the seed only picks batches.
"""
from __future__ import annotations

import random

CORPUS_SEED = 20240917
NUM_DOCUMENTS = 2000
SENTENCES_PER_DOCUMENT = (6, 16)

NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy")
NOUNS = (("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("fox", "foxes"), ("child", "children"),
         ("mouse", "mice"), ("box", "boxes"), ("tree", "trees"), ("horse", "horses"), ("king", "kings"))
VERBS = (("sees", "see"), ("likes", "like"), ("chases", "chase"), ("finds", "find"), ("watches", "watch"),
         ("carries", "carry"), ("helps", "help"), ("follows", "follow"))
ADJECTIVES = ("red", "small", "old", "quick", "happy", "quiet", "green", "tall", "brave", "lazy")
PLACES = ("garden", "house", "forest", "river", "market", "school", "castle", "field")


def _sentence(rng: random.Random, hero: str, place: str) -> str:
    name = hero if rng.random() < 0.5 else rng.choice(NAMES)
    noun_sg, noun_pl = rng.choice(NOUNS)
    other_sg, _ = rng.choice(NOUNS)
    verb_sg, verb_pl = rng.choice(VERBS)
    adj = rng.choice(ADJECTIVES)
    where = place if rng.random() < 0.5 else rng.choice(PLACES)
    kind = rng.randrange(6)
    if kind == 0:
        text = f"{name} {verb_sg} the {adj} {noun_sg}."
    elif kind == 1:
        text = f"the {noun_pl} {verb_pl} the {other_sg} in the {where}."
    elif kind == 2:
        text = f"the {adj} {noun_sg} {verb_sg} {name} near the {where}."
    elif kind == 3:
        a, b = rng.randrange(50), rng.randrange(50)
        text = f"{a} plus {b} is {a + b}."
    elif kind == 4:
        n = rng.randrange(90)
        text = f"{name} counts {n} {n + 1} {n + 2} {n + 3}."
    else:
        text = f"the {noun_sg} that {name} {verb_sg} is {adj}."
    return text[0].upper() + text[1:]


def synthetic_documents() -> list[tuple[str, str]]:
    """`NUM_DOCUMENTS` stories as `(name, text)`; the same on every call and machine."""
    rng = random.Random(CORPUS_SEED)
    documents = []
    for i in range(NUM_DOCUMENTS):
        hero, place = rng.choice(NAMES), rng.choice(PLACES)
        lines = [f"Story {i}: {hero.capitalize()} in the {place}."]
        lines += [_sentence(rng, hero, place) for _ in range(rng.randint(*SENTENCES_PER_DOCUMENT))]
        documents.append((f"story_{i:04d}", "\n".join(lines) + "\n"))
    return documents
