"""`minpairs`: grammatical minimal pairs from templates (BLiMP-style, in the corpus's English).

Each item is a grammatical sentence and the same sentence with one word changed so that it is
ungrammatical; the model is right when it gives the grammatical one the higher total
log-probability. The vocabulary (gentlemen, ladies, captains, Anne, Sir Walter, Olivia, "was
much pleased with the news") is that of the Austen novels and Shakespeare plays the models train
on, so the test is about agreement, not about unknown words.

Phenomena (`PER_PHENOMENON` pairs each, drawn with a fixed seed from every combination of the
template's slots, half with a singular (masculine) and half with a plural (feminine) good form):
  sv_simple       The captain was very kind.            / The captain were very kind.
  sv_across_pp    The sister of the captains was ...    / ... were ...  (attractor: other number)
  sv_across_rc    The lady that the captains met was ... / ... were ...
  det_noun        Anne admired this letter.            / Anne admired these letter.
                  (this/these and that/those, singular and plural nouns)
  anaphor_number  The gentlemen praised themselves.    / The gentlemen praised himself.
  anaphor_gender  Anne praised herself.                / Anne praised himself.
  there_be        There was a letter in the hall.      / There were a letter in the hall.
"""
from __future__ import annotations

import itertools
import random

SEED = 4321
PER_PHENOMENON = 50

# (singular, plural, gender of the referent: "m", "f" or None when either)
NOUNS = [
    ("gentleman", "gentlemen", "m"), ("lady", "ladies", "f"), ("captain", "captains", "m"),
    ("sister", "sisters", "f"), ("brother", "brothers", "m"), ("servant", "servants", None),
    ("friend", "friends", None), ("officer", "officers", "m"), ("daughter", "daughters", "f"),
    ("neighbour", "neighbours", None), ("admiral", "admirals", "m"), ("widow", "widows", "f"),
    ("stranger", "strangers", None), ("sailor", "sailors", "m"), ("cousin", "cousins", None),
]
# (3rd person singular, plural, complements that fit either number)
VERBS = [
    ("was", "were", ["very kind to Anne", "much pleased with the news", "in the garden",
                     "at Bath all the winter", "quite ill", "not at home"]),
    ("is", "are", ["very welcome here", "in great spirits", "gone to the sea"]),
    ("has", "have", ["been at sea these ten years", "never seen the house", "written to Anne"]),
    ("seems", "seem", ["very happy", "tired of the country"]),
    ("does", "do", ["not know the way", "not care for music"]),
]
RC_VERBS = ["met", "admired", "visited", "remembered", "praised"]
PREPOSITIONS = ["of", "with", "near"]
NAMES = [("Anne", "f"), ("Mary", "f"), ("Olivia", "f"), ("Viola", "f"), ("Lady Russell", "f"),
         ("Elizabeth", "f"), ("Charles", "m"), ("Sir Walter", "m"), ("Sebastian", "m"),
         ("Malvolio", "m"), ("Captain Wentworth", "m"), ("Mr Elliot", "m")]
REFLEXIVE_VERBS = ["praised", "blamed", "deceived", "flattered", "amused", "excused"]
OBJECTS = [("letter", "letters"), ("house", "houses"), ("garden", "gardens"),
           ("picture", "pictures"), ("book", "books"), ("ring", "rings"), ("song", "songs"),
           ("horse", "horses"), ("ship", "ships"), ("room", "rooms")]
OBJECT_VERBS = ["admired", "remembered", "praised", "liked", "described"]
PLACES = ["in the hall", "on the table", "at the door", "in the garden", "by the window"]
QUANTIFIERS = ["two", "three", "several", "many"]
REFLEXIVE = {"m": "himself", "f": "herself"}


def _sentence(*words: str) -> str:
    text = " ".join(w for w in words if w)
    return text[0].upper() + text[1:] + "."


# Each generator yields (feature, good, bad): feature is what the good sentence's changed word
# agrees with ("sg"/"pl" number, "m"/"f" gender), so sampling can balance the two directions.
def _sv_simple():
    for (sg, pl, _), (vs, vp, comps) in itertools.product(NOUNS, VERBS):
        for comp in comps:
            yield "sg", _sentence("the", sg, vs, comp), _sentence("the", sg, vp, comp)
            yield "pl", _sentence("the", pl, vp, comp), _sentence("the", pl, vs, comp)


def _sv_across_pp():
    for (sg, pl, _), (asg, apl, _), prep, (vs, vp, comps) in itertools.product(
            NOUNS, NOUNS, PREPOSITIONS, VERBS):
        if sg == asg:
            continue
        for comp in comps:  # the attractor has the other number than the subject
            yield ("sg", _sentence("the", sg, prep, "the", apl, vs, comp),
                   _sentence("the", sg, prep, "the", apl, vp, comp))
            yield ("pl", _sentence("the", pl, prep, "the", asg, vp, comp),
                   _sentence("the", pl, prep, "the", asg, vs, comp))


def _sv_across_rc():
    for (sg, pl, _), (asg, apl, _), rc, (vs, vp, comps) in itertools.product(
            NOUNS, NOUNS, RC_VERBS, VERBS):
        if sg == asg:
            continue
        for comp in comps:
            yield ("sg", _sentence("the", sg, "that the", apl, rc, vs, comp),
                   _sentence("the", sg, "that the", apl, rc, vp, comp))
            yield ("pl", _sentence("the", pl, "that the", asg, rc, vp, comp),
                   _sentence("the", pl, "that the", asg, rc, vs, comp))


def _det_noun():
    for (name, _), verb, (sg, pl) in itertools.product(NAMES, OBJECT_VERBS, OBJECTS):
        for d_sg, d_pl in (("this", "these"), ("that", "those")):
            yield "sg", _sentence(name, verb, d_sg, sg), _sentence(name, verb, d_pl, sg)
            yield "pl", _sentence(name, verb, d_pl, pl), _sentence(name, verb, d_sg, pl)


def _anaphor_number():
    for (sg, pl, gender), verb in itertools.product(NOUNS, REFLEXIVE_VERBS):
        if gender is None:
            continue  # "the friend praised themselves" is arguable today; keep pairs clear-cut
        yield ("sg", _sentence("the", sg, verb, REFLEXIVE[gender]),
               _sentence("the", sg, verb, "themselves"))
        yield ("pl", _sentence("the", pl, verb, "themselves"),
               _sentence("the", pl, verb, REFLEXIVE[gender]))


def _anaphor_gender():
    for (name, gender), verb in itertools.product(NAMES, REFLEXIVE_VERBS):
        other = "f" if gender == "m" else "m"
        yield (gender, _sentence(name, verb, REFLEXIVE[gender]),
               _sentence(name, verb, REFLEXIVE[other]))


def _there_be():
    for (sg, pl), place in itertools.product(OBJECTS, PLACES):
        yield "sg", _sentence("there was a", sg, place), _sentence("there were a", sg, place)
        for q in QUANTIFIERS:
            yield ("pl", _sentence("there were", q, pl, place),
                   _sentence("there was", q, pl, place))


PHENOMENA = {
    "sv_simple": _sv_simple, "sv_across_pp": _sv_across_pp, "sv_across_rc": _sv_across_rc,
    "det_noun": _det_noun, "anaphor_number": _anaphor_number,
    "anaphor_gender": _anaphor_gender, "there_be": _there_be,
}


def build(seed: int = SEED, per_phenomenon: int = PER_PHENOMENON) -> list[dict]:
    """The task's items: {"id", "phenomenon", "feature", "good", "bad"}, phenomena interleaved.

    Each phenomenon has as many items whose good sentence needs the singular (or masculine) form
    as the plural (or feminine) one, so a model that always prefers one form ("was" over "were",
    the shorter sentence) scores exactly chance.
    """
    rng = random.Random(seed)
    items = []
    for name, gen in PHENOMENA.items():
        by_feature: dict[str, list] = {}
        for feature, good, bad in sorted(set(gen())):  # every combination once, fixed order
            by_feature.setdefault(feature, []).append((good, bad))
        share = per_phenomenon // len(by_feature)
        for feature, pairs in sorted(by_feature.items()):
            for good, bad in rng.sample(pairs, min(share, len(pairs))):
                items.append({"phenomenon": name, "feature": feature, "good": good, "bad": bad})
    rng.shuffle(items)
    for i, it in enumerate(items):
        it["id"] = f"minpairs-{i:04d}"
    return items
