"""WordNet 3.0 as real English for retrieval and language-model checks, read offline.

WordNet's database files (``data.noun``, ``data.verb``, ``data.adj``, ``data.adv``; Debian package
``wordnet-base`` installs them in ``/usr/share/wordnet``) hold ~117k synsets, each with its
lemmas, a definition and often example sentences. That gives, without any download:

* a text retrieval task: the word (with its synonyms) <-> its definition;
* an instruction task for the LM loss: "Define the word X." -> the definition;
* held-out English that fine-tuning never sees (perplexity of definitions and examples).

The format is documented in wndb(5WN); only the fields used here are read. WordNet's licence
(Princeton) allows redistribution with its notice; a small sample ships with the tests.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PARTS_OF_SPEECH = ("noun", "verb", "adj", "adv")
DEFINE_PROMPT = "Define the word {word}."
# Where WordNet's database files are looked for, in order, when no directory is given.
_SEARCH_PATHS = ("/usr/share/wordnet", "/usr/local/share/wordnet", "/usr/local/WordNet-3.0/dict")
# Adjective lemmas carry a syntactic marker: "galore(ip)", "elect(p)", "beautiful(a)".
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")


@dataclass(frozen=True)
class Synset:
    """One WordNet synset: ``id`` is the part of speech's letter and the byte offset (``n02084071``)."""

    id: str
    pos: str
    lemmas: tuple[str, ...]
    definition: str
    examples: tuple[str, ...]

    @property
    def word(self) -> str:
        """The synset's first lemma (its headword)."""
        return self.lemmas[0]

    @property
    def words(self) -> str:
        """All lemmas joined: ``"bank, depository financial institution"`` (the word side of retrieval)."""
        return ", ".join(self.lemmas)


def find_wordnet_dir(directory: str | os.PathLike | None = None) -> Path:
    """The folder holding WordNet's ``data.*`` files: `directory`, ``$WORDNET_DIR`` or a system path."""
    candidates = [directory] if directory is not None else [os.environ.get("WORDNET_DIR"), *_SEARCH_PATHS]
    for candidate in candidates:
        if candidate and (Path(candidate) / "data.noun").is_file():
            return Path(candidate)
    where = str(directory) if directory is not None else ", ".join(["$WORDNET_DIR", *_SEARCH_PATHS])
    raise FileNotFoundError(
        f"No WordNet database (data.noun) in {where}. Install it with `apt-get install wordnet-base` "
        "(Debian/Ubuntu) or point WORDNET_DIR at a folder with WordNet 3.0's data.* files."
    )


def parse_data_line(line: str, pos: str) -> Synset | None:
    """One line of a ``data.<pos>`` file -> a `Synset`; ``None`` for the licence header lines.

    Line layout (wndb(5WN)): ``offset lex_filenum ss_type w_cnt (word lex_id){w_cnt} p_cnt
    (ptr){p_cnt} [frames] | gloss``, with ``w_cnt`` in hexadecimal. The gloss is the definition
    followed by ``; "example"`` sentences.
    """
    if line.startswith("  ") or not line.strip():
        return None  # the licence header is indented by two spaces
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    offset, word_count = fields[0], int(fields[3], 16)
    lemmas = []
    for i in range(word_count):
        lemma = _ADJ_MARKER.sub("", fields[4 + 2 * i]).replace("_", " ")
        if lemma not in lemmas:
            lemmas.append(lemma)
    definition, examples = split_gloss(gloss)
    return Synset(f"{pos[0]}{offset}", pos, tuple(lemmas), definition, examples)


def split_gloss(gloss: str) -> tuple[str, tuple[str, ...]]:
    """``'a domestic dog; "the dog barked"'`` -> ``("a domestic dog", ("the dog barked",))``."""
    gloss = gloss.strip()
    quote = gloss.find('"')
    definition = (gloss if quote < 0 else gloss[:quote]).strip().rstrip(";").strip()
    examples = tuple(e.strip() for e in re.findall(r'"([^"]+)"', gloss[quote:] if quote >= 0 else "") if e.strip())
    return definition, examples


def read_wordnet(
    directory: str | os.PathLike | None = None, parts_of_speech: Sequence[str] = PARTS_OF_SPEECH
) -> list[Synset]:
    """Every synset of the given parts of speech, in file order."""
    root = find_wordnet_dir(directory)
    synsets = []
    for pos in parts_of_speech:
        if pos not in PARTS_OF_SPEECH:
            raise ValueError(f"Unknown part of speech {pos!r}; WordNet has {PARTS_OF_SPEECH}.")
        with open(root / f"data.{pos}", encoding="utf-8") as f:
            for line in f:
                synset = parse_data_line(line, pos)
                if synset is not None:
                    synsets.append(synset)
    return synsets


def retrieval_synsets(synsets: Iterable[Synset], min_definition_words: int = 3) -> list[Synset]:
    """Synsets usable as retrieval items: a definition of a few words and a word side no other has.

    Two synsets with the same lemmas (``"bank"`` the institution and ``"bank"`` the slope) would be
    indistinguishable queries, so only the first of each word side is kept.
    """
    seen: set[str] = set()
    kept = []
    for synset in synsets:
        if len(synset.definition.split()) < min_definition_words or synset.words in seen:
            continue
        seen.add(synset.words)
        kept.append(synset)
    return kept


def split_synsets(
    synsets: Sequence[Synset], test_fraction: float, salt: str = "cafe-wordnet"
) -> tuple[list[Synset], list[Synset]]:
    """A deterministic train / test split by a hash of the synset id (stable across runs and subsets)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    train: list[Synset] = []
    test: list[Synset] = []
    for synset in synsets:
        digest = hashlib.sha256(f"{salt}/{synset.id}".encode()).digest()
        (test if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else train).append(synset)
    return train, test


def definition_record(synset: Synset, prompt: str = DEFINE_PROMPT) -> dict[str, Any]:
    """A training record: LM on "Define the word X." -> definition, contrast word side <-> definition.

    A text-only conversation with a ``query`` (see `cafe.records`): the LM loss falls on the
    definition, and the contrastive pair is (all lemmas, the definition).
    """
    return {
        "conversations": [
            {"from": "human", "value": prompt.format(word=synset.word)},
            {"from": "gpt", "value": synset.definition},
        ],
        "query": synset.words,
        "id": synset.id,
    }
