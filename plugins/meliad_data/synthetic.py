"""The `synthetic` source: generated documents with local *and* long-range structure.

Each document is a "ledger". Its first paragraph states a few facts, each pairing a made-up name with
a random value (a code such as `QX-4821`, or a home town such as `Velomere`). Then comes filler prose
built from templated sentences and a small lexicon (learnable from local context), and, every so often,
a fact is asked for again: "Asked again, the clerk said that the code of Tarin is QX-4821." The value
cannot be guessed from the filler or from other documents (names and values are drawn afresh for each
document); only a model that carries the start of the document (XL cache, kNN memory, recurrent state)
can copy it. Every recalled value is at least `min_recall_distance` characters after the previous
mention of the same fact, and its character span is tagged in `Document.long_range_spans`, so the
stream marks its tokens in `batch["long_range"]`.

Documents are generated on demand from (corpus_seed, split, index): the corpus is the same for every
run seed (the run seed only shuffles it), and the train and eval splits are different documents
(meliad's own synthetic set used the same texts for both, spec §9.1).

Options (`data.options`):
    num_documents        train documents per epoch (default 1024)
    num_eval_documents   eval documents (default 128)
    document_length      characters of filler-plus-recall text to reach before the ledger closes (6000)
    num_facts            facts stated per document (6)
    recalls_per_fact     times each fact is asked for again (2)
    min_recall_distance  characters between a fact's mention and its recall (512)
    near_recalls         beyond meliad: after each fact is stated, this many facts stated so far (drawn
                         at random) are read back at once ("Read back: the code of ... is ...") (0).
                         These read-backs are within a local window's reach (a few sentences back) and
                         are *not* tagged long-range: they let every model learn to copy a value by its
                         name locally, which the memory and the recurrent state can then apply to the
                         far recalls (docs/long_range.md)
    value_letters        beyond meliad: 0 (default) gives codes and home towns; L > 0 makes every value a
                         code of L random lowercase letters ("The code of Tarin is qwhdkeifmzla."), whose
                         letters after the first few can be copied by the preceding ones (each value's
                         letter pairs are rare in a document), a denser copy signal than a name
                         (docs/long_range.md)
    layout               beyond meliad: `prose` (default) is the ledger above; `lines` states one fact per line
                         ("Tarin: fold weary lamp.") and, after 7 statements in 10, reads one of the last
                         three back at once ("Tarin = fold weary lamp."), so a read-back comes after up to two
                         other facts' statements and only its name and content say where its value is. The facts to recall
                         open the document, fresh one-off facts fill it, and a far recall is a read-back
                         line at least `min_recall_distance` characters after the fact's last mention, its
                         value tagged long-range. The read-backs teach a content-keyed copy, the one skill
                         the memory needs to use what it holds (docs/long_range.md, experiments 13-15)
    read_back_distance   beyond meliad, `lines` layout: D > 0 makes each read-back read one of the last three
                         facts stated at least d characters before it, d drawn uniformly in [0, D], so that
                         some copies lie where the relative position bias no longer tells distances apart
                         (0, the default: one of the last three facts stated)
    read_back_rate       beyond meliad, `lines` layout: the chance that a statement is followed by a read-back
                         (0.7); 1.0 doubles the content-keyed copies a model trains on
    value_words          beyond meliad: K > 0 makes every value K words drawn from `ledger_words.txt` (2017
                         lowercase words, each one piece of the PG19 4000-piece SentencePiece vocabulary), so
                         that with that vocabulary each word is one token (0: codes, or `value_letters`)
    corpus_seed          which corpus (0)
"""

from __future__ import annotations

import collections.abc
import functools
from collections.abc import Callable
import pathlib
import random

from meliad_core.config import RecipeError
from meliad_core.data import Document

from ._options import get_float, get_int

# bounds that stop absurd values before anything is generated (far above any real use)
MAX_DOCUMENTS = 10_000_000
MAX_DOCUMENT_LENGTH = 100_000_000  # characters, like a very long book
MAX_FACTS = 100_000
MAX_VALUE_LETTERS = 1000
MAX_VALUE_WORDS = 1000

OPTIONS = ("num_documents", "num_eval_documents", "document_length", "num_facts", "recalls_per_fact",
           "min_recall_distance", "near_recalls", "value_letters", "layout", "value_words", "read_back_distance",
           "read_back_rate", "corpus_seed")
LAYOUTS = ("prose", "lines")
LINES_VALUE_LETTERS = 12  # the `lines` layout's values when neither value_words nor value_letters is set
READ_BACK_RATE = 0.7  # the `lines` layout: the chance that a statement is followed by a read-back ...
READ_BACK_FROM = 3  # ... of one of the last 3 facts stated (0-2 other lines between: no fixed offset)

SYLLABLES = ("ka", "ri", "to", "mel", "an", "dor", "vi", "sa", "lu", "ben", "tor", "eth", "ni", "ro", "gal",
             "fen", "mi", "os", "ar", "quin", "bel", "ta", "zu", "ler", "mo", "ca", "del", "ha", "ur", "pe")
PLACE_ENDINGS = ("holm", "mere", "wick", "stead", "garth", "combe")
LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"
DIGITS = "0123456789"

ADJECTIVES = ("old", "young", "quiet", "tall", "small", "grey", "bright", "tired", "clever", "patient",
              "brave", "careful")
NOUNS = ("miller", "baker", "sailor", "farmer", "weaver", "clerk", "smith", "shepherd", "fisher", "potter",
         "mason", "carter", "widow", "scholar", "hunter", "cook")
OBJECTS = ("basket", "lantern", "letter", "barrel", "rope", "sack of grain", "bundle of wool", "ledger",
           "kettle", "wooden box", "map", "bell", "coat", "net")
VERBS = ("carried", "mended", "sold", "found", "painted", "counted", "lost", "bought", "opened", "hid",
         "weighed", "cleaned")
PLACES = ("river", "market", "mill", "harbour", "church", "bridge", "square", "well", "gate", "inn", "orchard",
          "quay")
PREPOSITIONS = ("near", "behind", "beside", "beyond", "across from", "inside")
TIMES = ("In the morning", "At noon", "Before dusk", "Late that night", "On the next day", "After the rain")
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven")
LEADS = ("Asked again, the clerk said that", "As the ledger records,", "Let it be repeated that",
         "When the steward checked once more,", "Everyone in town agreed that", "It was written again that")


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def _place(rng: random.Random) -> str:
    return ("".join(rng.choice(SYLLABLES) for _ in range(2)) + rng.choice(PLACE_ENDINGS)).capitalize()


def _code(rng: random.Random) -> str:
    return rng.choice(LETTERS) + rng.choice(LETTERS) + "-" + "".join(rng.choice(DIGITS) for _ in range(4))


def _letters(rng: random.Random, count: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(count))


@functools.lru_cache(maxsize=1)
def ledger_words() -> tuple[str, ...]:
    return tuple(pathlib.Path(__file__).with_name("ledger_words.txt").read_text().split())


def _words(rng: random.Random, count: int) -> str:
    words = ledger_words()
    return " ".join(rng.choice(words) for _ in range(count))


def _filler(rng: random.Random) -> str:
    """One sentence of local structure: templates over a small lexicon, some with a repetition."""
    kind = rng.randrange(5)
    a, n, o = rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(OBJECTS)
    v, p = rng.choice(VERBS), rng.choice(PLACES)
    if kind == 0:
        return f"The {a} {n} {v} the {o} {rng.choice(PREPOSITIONS)} the {p}."
    if kind == 1:
        return f"{rng.choice(TIMES)}, the {n} {v} a {o}, and then the {n} {v} it again."
    if kind == 2:
        k = rng.randrange(2, len(NUMBERS))
        count = ", ".join(NUMBERS[:k + 1])
        return f"The {n} counted the bells of the {p}: {count}."
    if kind == 3:
        other = rng.choice(NOUNS)
        return f"The {n} asked the {other} about the {o}, but the {other} had not seen the {o}."
    return f"{rng.choice(TIMES)}, the {a} {n} walked to the {p} and waited."


class SyntheticLedgers(collections.abc.Sequence):
    """The documents of one split, generated on demand (a random-access Sequence)."""

    def __init__(self, split: str, num_documents: int, document_length: int = 6000, num_facts: int = 6,
                 recalls_per_fact: int = 2, min_recall_distance: int = 512, corpus_seed: int = 0,
                 near_recalls: int = 0, value_letters: int = 0, layout: str = "prose", value_words: int = 0,
                 read_back_distance: int = 0, read_back_rate: float = READ_BACK_RATE):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.split = split
        self.num_documents = num_documents
        self.document_length = document_length
        self.num_facts = num_facts
        self.recalls_per_fact = recalls_per_fact
        self.min_recall_distance = min_recall_distance
        self.corpus_seed = corpus_seed
        self.near_recalls = near_recalls
        self.value_letters = value_letters
        self.layout = layout
        self.value_words = value_words
        self.read_back_distance = read_back_distance
        self.read_back_rate = read_back_rate

    def __len__(self) -> int:
        return self.num_documents

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.generate(index)

    def _value(self, rng: random.Random, default_letters: int = 0) -> str:
        if self.value_words:
            return _words(rng, self.value_words)
        return _letters(rng, self.value_letters or default_letters)

    def generate(self, index: int) -> Document:
        if self.layout == "lines":
            return self.generate_lines(index)
        # Seeding random.Random with a str hashes it with SHA-512: stable across Python versions.
        rng = random.Random(f"meliad-synthetic/{self.corpus_seed}/{self.split}/{index}")
        names: list[str] = []
        while len(names) < self.num_facts:
            name = _name(rng)
            if not any(name.startswith(m) or m.startswith(name) for m in names):
                names.append(name)
        facts = []  # (statement, recall template, value)
        for name in names:
            if self.value_letters or self.value_words:
                value = self._value(rng)
                facts.append((f"The code of {name} is {value}.", f"the code of {name} is ", value))
            elif rng.random() < 0.5:
                value = _code(rng)
                facts.append((f"The code of {name} is {value}.", f"the code of {name} is ", value))
            else:
                value = _place(rng)
                facts.append((f"{name} lives in {value}.", f"{name} still lives in ", value))

        parts: list[str] = []
        length = 0
        spans: list[tuple[int, int]] = []
        last_mention = [0] * len(facts)

        def add(text: str) -> int:
            nonlocal length
            parts.append(text)
            length += len(text)
            return length - len(text)

        add(f"The ledger of {_place(rng)}, number {index}.\n")
        add("These facts were written down first.")
        for f, (statement, _, value) in enumerate(facts):
            add(" ")
            at = add(statement)
            last_mention[f] = at + statement.index(value)
            for _ in range(self.near_recalls):
                g = rng.randrange(f + 1)
                _, template, value = facts[g]
                add(f" Read back: {template}")
                last_mention[g] = add(value)
                add(".")
        add("\n")
        def recall(f: int) -> None:
            _, template, value = facts[f]
            add(f"{rng.choice(LEADS)} {template}")
            start = add(value)
            add(".")
            spans.append((start, start + len(value)))
            last_mention[f] = start
            add("\n" if rng.random() < 0.15 else " ")

        def fill() -> None:
            add(_filler(rng))
            add("\n" if rng.random() < 0.15 else " ")

        self._fill_and_recall(rng, len(facts), lambda: length, last_mention.__getitem__, recall, fill)
        add("Here the ledger ends.\n")
        return Document("".join(parts), tuple(spans), name=f"synthetic/{self.split}/{index}")

    def _fill_and_recall(self, rng: random.Random, num_facts: int, length: Callable[[], int],
                         last_mention: Callable[[int], int], recall: Callable[[int], None],
                         fill: Callable[[], None]) -> None:
        """Both layouts' body: `fill()` until the document is `document_length` long, with each fact's
        `recall(f)` at random places after the facts, each at least `min_recall_distance` characters
        after the fact's last mention (a recall that comes too close is put off)."""
        distance, start = self.min_recall_distance, length()
        end = max(self.document_length, start + distance)
        pending = sorted((rng.randint(start + distance, end), f)
                         for f in range(num_facts) for _ in range(self.recalls_per_fact))
        while length() < self.document_length or pending:
            if pending and length() >= pending[0][0]:
                _, f = pending.pop(0)
                if length() - last_mention(f) < distance:  # too close to its last mention: later
                    pending.append((last_mention(f) + distance, f))
                    pending.sort()
                    continue
                recall(f)
            else:
                fill()

    def generate_lines(self, index: int) -> Document:
        """The `lines` layout: a fact per line, most read back a line or two later, some recalled far."""
        rng = random.Random(f"meliad-synthetic-lines/{self.corpus_seed}/{self.split}/{index}")
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        length = 0
        used: set[str] = set()

        def add(text: str) -> int:
            nonlocal length
            parts.append(text)
            length += len(text)
            return length - len(text)

        def fresh_fact() -> tuple[str, str]:
            while True:  # a name of its own, so that a name points to one fact only
                name = _name(rng)
                if name not in used:
                    used.add(name)
                    return name, self._value(rng, LINES_VALUE_LETTERS)

        last_mention: dict[str, int] = {}

        def write(fact: tuple[str, str], mark: str, recall: bool = False) -> None:
            name, value = fact
            add(f"{name}{mark}")
            start = add(value)
            add(".\n")
            last_mention[name] = start
            if recall:
                spans.append((start, start + len(value)))

        statements: list[tuple[int, tuple[str, str]]] = []  # (where, fact), in order

        def state(fact: tuple[str, str]) -> None:
            statements.append((add(""), fact))
            write(fact, ": ")
            if rng.random() < self.read_back_rate:
                # the last READ_BACK_FROM facts stated at least d characters back, d in [0, read_back_distance]
                reach = rng.randint(0, self.read_back_distance)
                cut = len(statements)
                while cut and statements[cut - 1][0] > length - reach:
                    cut -= 1
                candidates = statements[max(0, cut - READ_BACK_FROM):cut]
                if candidates:
                    write(rng.choice(candidates)[1], " = ")

        add(f"The ledger of {_place(rng)}, number {index}.\n")
        facts = [fresh_fact() for _ in range(self.num_facts)]
        for fact in facts:
            state(fact)
        self._fill_and_recall(rng, len(facts), lambda: length, lambda f: last_mention[facts[f][0]],
                              lambda f: write(facts[f], " = ", recall=True), lambda: state(fresh_fact()))
        add("Here the ledger ends.\n")
        return Document("".join(parts), tuple(spans), name=f"synthetic/{self.split}/{index}")


def open_synthetic(data_config, split: str, seed: int) -> SyntheticLedgers:
    """Factory for the `synthetic` source; `seed` is unused (the stream shuffles the Sequence)."""
    options = data_config.options or {}
    layout = options.get("layout", "prose")
    if layout not in LAYOUTS:
        raise RecipeError(f"data.options.layout: got {layout!r}, expected one of {', '.join(LAYOUTS)}")
    near_recalls = get_int(options, "near_recalls", 0, minimum=0, maximum=MAX_FACTS)
    if layout == "lines" and near_recalls:
        raise RecipeError("data.options.near_recalls: only the prose layout takes it (the lines layout reads "
                          "facts back on its own); remove it or use layout: prose")
    read_back_distance = get_int(options, "read_back_distance", 0, minimum=0, maximum=MAX_DOCUMENT_LENGTH)
    if layout == "prose" and read_back_distance:
        raise RecipeError("data.options.read_back_distance: only the lines layout takes it; remove it or set "
                          "data.options.layout: lines")
    read_back_rate = get_float(options, "read_back_rate", READ_BACK_RATE, 0.0, 1.0)
    if layout == "prose" and "read_back_rate" in options:
        raise RecipeError("data.options.read_back_rate: only the lines layout takes it; remove it or set "
                          "data.options.layout: lines")
    value_words = get_int(options, "value_words", 0, minimum=0, maximum=MAX_VALUE_WORDS)
    value_letters = get_int(options, "value_letters", 0, minimum=0, maximum=MAX_VALUE_LETTERS)
    if value_words and value_letters:
        raise RecipeError("data.options.value_words and value_letters: set one of them, not both")
    count = (get_int(options, "num_documents", 1024, minimum=1, maximum=MAX_DOCUMENTS) if split == "train"
             else get_int(options, "num_eval_documents", 128, minimum=1, maximum=MAX_DOCUMENTS))
    return SyntheticLedgers(
        split,
        count,
        document_length=get_int(options, "document_length", 6000, minimum=1, maximum=MAX_DOCUMENT_LENGTH),
        num_facts=get_int(options, "num_facts", 6, minimum=1, maximum=MAX_FACTS),
        recalls_per_fact=get_int(options, "recalls_per_fact", 2, minimum=0, maximum=MAX_FACTS),
        min_recall_distance=get_int(options, "min_recall_distance", 512, minimum=1, maximum=MAX_DOCUMENT_LENGTH),
        corpus_seed=get_int(options, "corpus_seed", 0, minimum=0),
        near_recalls=near_recalls,
        value_letters=value_letters,
        layout=layout,
        value_words=value_words,
        read_back_distance=read_back_distance,
        read_back_rate=read_back_rate,
    )


open_synthetic.options = OPTIONS
