"""A small, deterministic multi-domain review corpus: fastmft's embedded demo data.

Each domain has its own vocabulary (products, parts, verbs); sentiment cues are shared across
domains, so a classifier can transfer between them. A fraction of the instances is atypical on
purpose: they talk about another domain's things, or carry few and mixed sentiment cues. Typicality
scoring should rank them low, as Table 5 of the MFT paper shows for real reviews.
"""

from __future__ import annotations

import random

DOMAIN_WORDS = {
    "books": {
        "things": ["novel", "story", "author", "chapter", "plot", "paperback", "biography", "narrator"],
        "parts": ["the characters", "the ending", "the prose", "the dialogue", "the opening chapter"],
        "acts": ["read", "finished", "lent out", "reread"],
    },
    "electronics": {
        "things": ["charger", "headphones", "camera", "battery", "speaker", "remote", "cable", "router"],
        "parts": ["the sound", "the battery life", "the screen", "the buttons", "the connection"],
        "acts": ["plugged in", "set up", "charged", "installed"],
    },
    "kitchen": {
        "things": ["blender", "skillet", "kettle", "knife set", "toaster", "mixer", "pan", "coffee maker"],
        "parts": ["the handle", "the lid", "the blade", "the nonstick coating", "the heating"],
        "acts": ["cooked with", "washed", "baked with", "used daily"],
    },
    "movies": {
        "things": ["film", "movie", "sequel", "documentary", "soundtrack", "director's cut", "series", "cast"],
        "parts": ["the acting", "the script", "the special effects", "the pacing", "the final scene"],
        "acts": ["watched", "rented", "streamed", "saw twice"],
    },
}
POSITIVE = ["great", "excellent", "wonderful", "fantastic", "superb", "delightful", "reliable", "brilliant"]
NEGATIVE = ["terrible", "awful", "disappointing", "poor", "useless", "boring", "flimsy", "dreadful"]
POSITIVE_CLOSERS = ["I would recommend it to anyone.", "Worth every penny.", "I love it.", "Five stars from me."]
NEGATIVE_CLOSERS = ["I would not recommend it.", "A waste of money.", "I returned it.", "Avoid this one."]
LABELS = ("negative", "positive")
# rows per domain of the corpus `fastmft train` and `fastmft typicality` use without --data
SYNTHETIC_PER_DOMAIN = 200


def _review(rng: random.Random, words: dict, positive: bool, cues: int) -> str:
    polar = POSITIVE if positive else NEGATIVE
    thing, part, act = rng.choice(words["things"]), rng.choice(words["parts"]), rng.choice(words["acts"])
    sentences = [f"I {act} this {thing} last week."]
    for _ in range(cues):
        sentences.append(f"{part.capitalize()} is {rng.choice(polar)}.")
        part = rng.choice(words["parts"])
    sentences.append(rng.choice(POSITIVE_CLOSERS if positive else NEGATIVE_CLOSERS))
    return " ".join(sentences)


def _atypical_review(rng: random.Random, words: dict, other: dict, positive: bool) -> str:
    polar, contra = (POSITIVE, NEGATIVE) if positive else (NEGATIVE, POSITIVE)
    thing, part = rng.choice(other["things"]), rng.choice(other["parts"])
    return (
        f"Bought this {rng.choice(words['things'])} as a gift, but mostly we talked about a {thing}. "
        f"{part.capitalize()} was {rng.choice(contra)}, though overall {rng.choice(polar)} enough."
    )


def synthetic_corpus(
    per_domain: int = 64,
    *,
    domains: int = 4,
    atypical_fraction: float = 0.125,
    seed: int = 0,
) -> list[dict]:
    """Rows {id, text, label ("negative"/"positive"), domain, split, atypical}, balanced per
    domain and label, the same for the same arguments on any machine. Splits: 70 % train, 15 %
    dev, 15 % test of each (domain, label) cell."""
    if not 1 <= domains <= len(DOMAIN_WORDS):
        raise ValueError(f"domains must be in [1, {len(DOMAIN_WORDS)}], got {domains}")
    if per_domain < 2:
        raise ValueError(f"per_domain must be >= 2, got {per_domain}")
    if not 0.0 <= atypical_fraction < 1.0:
        raise ValueError(f"atypical_fraction must be in [0, 1), got {atypical_fraction}")
    rng = random.Random(seed)
    names = list(DOMAIN_WORDS)[:domains]
    rows = []
    for name in names:
        words = DOMAIN_WORDS[name]
        others = [DOMAIN_WORDS[o] for o in DOMAIN_WORDS if o != name]
        for label in LABELS:
            count = per_domain // 2 + (per_domain % 2 if label == "positive" else 0)
            atypical_rows = set(rng.sample(range(count), round(count * atypical_fraction)))
            for i in range(count):
                atypical = i in atypical_rows
                positive = label == "positive"
                text = (
                    _atypical_review(rng, words, rng.choice(others), positive)
                    if atypical
                    else _review(rng, words, positive, cues=rng.randint(1, 3))
                )
                frac = i / count
                split = "train" if frac < 0.7 else ("dev" if frac < 0.85 else "test")
                rows.append(
                    {
                        "id": f"{name}-{label[:3]}-{i:04d}",
                        "text": text,
                        "label": label,
                        "domain": name,
                        "split": split,
                        "atypical": atypical,
                    }
                )
    return rows


def synthetic_dataset(per_domain: int = 64, **kwargs):
    """:func:`synthetic_corpus` as a ``datasets.Dataset``."""
    import datasets

    return datasets.Dataset.from_list(synthetic_corpus(per_domain, **kwargs))
