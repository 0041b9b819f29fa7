"""Deterministic generators of the bundled instruction datasets (``python -m lorakit.data.bundled.generate``).

Each generator takes a seed and returns records; ``write_all`` writes the shipped JSONL files. The records are
unique by input, so a train/val split never puts the same question on both sides.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

N_EXAMPLES = 2000
SEED = 1234

# Common English words, mostly one SmolLM2 token each, keep examples short (~40 tokens with the chat template).
# The first 57 were the whole vocabulary until the fresh-question scorecard showed what that teaches: the adapter
# copied them, and on unseen words (_FRESH_WORDS) it garbled the first one ("bottle" -> "bunker") or fused
# neighbours ("fire storm" -> "firestorm"). The rest widen it so the data teaches the rule, not a word list
# (what it took and what it gave: docs/data.md, "The bundled tasks").
_WORDS = (
    "apple river blue stone cloud green table window horse light paper music garden winter silver orange tiger "
    "candle bread ocean forest yellow mountain sugar pencil rabbit mirror thunder copper violet basket lemon "
    "shadow bridge falcon marble meadow coffee rocket planet velvet island anchor crystal desert feather hammer "
    "jacket kettle ladder needle pillow ribbon saddle tunnel wagon zebra "
    "lion wolf bear eagle owl fox deer goat sheep camel whale shark dolphin otter beaver badger turtle lizard "
    "snake frog spider beetle butterfly moth parrot pigeon swan goose duck penguin monkey gorilla panda koala "
    "kangaroo giraffe elephant donkey pony llama salmon lobster crab oyster squirrel hedgehog mouse hamster "
    "cheese butter honey carrot potato tomato onion garlic cherry grape peach plum melon banana mango olive "
    "walnut almond noodle rice soup cookie cake pie muffin biscuit pickle yogurt cereal pasta pizza bacon "
    "sausage vinegar ginger cinnamon vanilla cocoa tea juice syrup toast spoon fork knife plate bowl jar bucket "
    "barrel rope chain wheel engine bicycle helmet glove scarf boot sock sweater blanket curtain carpet sofa "
    "desk shelf drawer clock watch camera radio phone screen keyboard cable battery magnet compass lantern torch "
    "umbrella wallet ticket envelope stamp letter crayon brush comb razor towel soap sponge bandage button "
    "zipper pocket thread fabric cotton wool leather plastic rubber valley canyon cliff cave volcano glacier "
    "beach coast harbor pond stream swamp jungle prairie oasis breeze rain fog frost hail rainbow sunset dawn "
    "dusk autumn comet galaxy orbit pebble boulder cactus fern moss oak maple pine willow tulip rose daisy lily "
    "orchid seed root leaf branch thorn castle tower temple church school library museum market bakery factory "
    "garage barn cabin palace prison stadium airport station village avenue alley kitchen attic cellar balcony "
    "hallway farmer teacher pilot sailor soldier painter singer dancer baker butcher tailor judge nurse artist "
    "poet wizard knight pirate giant dragon robot ghost angel hero captain red purple pink brown black white "
    "gray crimson scarlet indigo amber ivory bronze brave quiet happy gentle rapid frozen ancient bright dark "
    "soft heavy tiny wild calm empty hollow rough smooth sharp sweet bitter sour warm cold fresh").split()

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
        "seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_to_words(n: int) -> str:
    """American English words for 0 <= n < 1,000,000 ("three hundred forty-seven", no "and")."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"{n} is out of range")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {number_to_words(rest)}" if rest else "")
    thousands, rest = divmod(n, 1000)
    return f"{number_to_words(thousands)} thousand" + (f" {number_to_words(rest)}" if rest else "")


def reverse_words_records(n: int = N_EXAMPLES, seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    while len(out) < n:
        words = rng.sample(_WORDS, rng.randint(3, 6))
        text = " ".join(words)
        if text in seen:
            continue
        seen.add(text)
        out.append({"instruction": "Reverse the order of the words.", "input": text, "output": " ".join(reversed(words))})
    return out


# How number-words draws its numbers (0 <= n < 100,000):
#   magnitudes: one of [0, 99], [100, 999], [1000, 99999] at random, then a number in it. Unique numbers exhaust
#       [0, 99] after 100 draws, so 2,000 records hold 10 one-digit, 90 two-digit, 680 three-digit, 91 four-digit
#       and 1,129 five-digit numbers: three- and four-digit numbers come out under-represented.
#   digits: the digit count uniformly from 1-5, then a number with that many digits: every one- and two-digit
#       number, and about 633 each of three, four and five digits.
NUMBER_MIXES = ("magnitudes", "digits")
NUMBER_MIX = "magnitudes"


def _draw_number(rng: random.Random, mix: str) -> int:
    if mix == "digits":
        digits = rng.randint(1, 5)
        return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)
    if mix == "magnitudes":
        return rng.choice([rng.randint(0, 99), rng.randint(100, 999), rng.randint(1000, 99_999)])
    raise ValueError(f"unknown number mix {mix!r}; choose one of {', '.join(NUMBER_MIXES)}")


def number_words_records(n: int = N_EXAMPLES, seed: int = SEED, mix: str = NUMBER_MIX) -> list[dict]:
    rng = random.Random(seed + 1)
    seen: set[int] = set()
    out = []
    while len(out) < n:
        # Mix magnitudes so every part of the rule (teens, tens, hundreds, thousands) is seen.
        value = _draw_number(rng, mix)
        if value in seen:
            continue
        seen.add(value)
        out.append({"instruction": "Write the number in English words.", "input": str(value),
                    "output": number_to_words(value)})
    return out


GENERATORS = {"reverse-words": reverse_words_records, "number-words": number_words_records}

# Words the bundled data never uses: fresh reverse-words questions test the skill (reverse any words), not recall
# of the training vocabulary.
_FRESH_WORDS = (
    "bottle doctor pepper summer chair dog fish bird tree road city house money water fire snow moon star ship "
    "train king queen book door hat lamp cup milk salt gold iron glass smoke storm flower wood sand rock hill lake "
    "field coat shoe ring bell drum box egg"
).split()
assert not set(_FRESH_WORDS) & set(_WORDS) and len(set(_WORDS)) == len(_WORDS)


FRESH_QUESTIONS = 40  # what fresh-question benchmarks ask per task unless told otherwise


def fresh_records(name: str, n: int = FRESH_QUESTIONS, seed: int = 99, train_examples: int = N_EXAMPLES,
                  mix: str = NUMBER_MIX) -> list[dict]:
    """``n`` questions of the bundled task ``name`` that its generated data (``train_examples`` records, the shipped
    file by default; number-words drawn with ``mix``) cannot contain: reverse-words over words outside its
    vocabulary, number-words over numbers it does not use, drawn the same way. Same instruction, same answer rule."""
    if name == "reverse-words":
        rng, out, seen = random.Random(seed), [], set()
        while len(out) < n:
            words = rng.sample(_FRESH_WORDS, rng.randint(3, 6))
            if (text := " ".join(words)) not in seen:
                seen.add(text)
                out.append({"instruction": "Reverse the order of the words.", "input": text,
                            "output": " ".join(reversed(words))})
        return out
    if name == "number-words":
        used = {int(r["input"]) for r in number_words_records(train_examples, mix=mix)}
        rng, out = random.Random(seed), []
        while len(out) < n:
            value = _draw_number(rng, mix)
            if value not in used:
                used.add(value)
                out.append({"instruction": "Write the number in English words.", "input": str(value),
                            "output": number_to_words(value)})
        return out
    raise ValueError(f"no bundled task named {name!r}; choose one of {', '.join(GENERATORS)}")


def render_jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode()


def write_all(folder: Path | None = None) -> list[Path]:
    folder = folder or Path(__file__).resolve().parent
    paths = []
    for name, gen in GENERATORS.items():
        path = folder / f"{name}.jsonl"
        path.write_bytes(render_jsonl(gen()))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_all():
        print(p, p.stat().st_size)
