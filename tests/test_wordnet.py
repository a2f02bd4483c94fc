"""WordNet reader on a sample of the real database files (tests/data/wordnet: the licence header
and 12 lines per part of speech, copied from Debian's wordnet-base; WordNet's licence allows it)."""

from pathlib import Path

import pytest

from cafe.data.wordnet import (
    Synset,
    definition_record,
    find_wordnet_dir,
    parse_data_line,
    read_wordnet,
    retrieval_synsets,
    split_gloss,
    split_synsets,
)
from cafe.records import RecordError, RecordParser

SAMPLE = Path(__file__).parent / "data" / "wordnet"


def test_reads_every_part_of_speech_and_skips_the_licence_header():
    synsets = read_wordnet(SAMPLE)
    assert len(synsets) == 48  # 12 lines per file, the header lines are not synsets
    assert {s.pos for s in synsets} == {"noun", "verb", "adj", "adv"}
    able = next(s for s in synsets if s.id == "a00001740")
    assert able.lemmas == ("able",)
    assert able.definition == (
        "(usually followed by `to') having the necessary means or skill or know-how or authority to do something"
    )
    assert able.examples[:2] == ("able to swim", "she was able to program her computer")


def test_a_data_line_gives_lemmas_without_markers_or_underscores():
    line = (
        "00020410 00 s 04 unapproachable 0 unreachable 0 unreached 0 out_of_reach(p) 0 001 & 00019874 a 0000 "
        '| inaccessibly located or situated; "an unapproachable chalet"  \n'
    )
    synset = parse_data_line(line, "adj")
    assert synset == Synset(
        "a00020410",
        "adj",
        ("unapproachable", "unreachable", "unreached", "out of reach"),
        "inaccessibly located or situated",
        ("an unapproachable chalet",),
    )
    assert synset.words == "unapproachable, unreachable, unreached, out of reach"
    assert parse_data_line("  1 This software and database is being provided\n", "noun") is None


def test_word_counts_are_hexadecimal():
    lemmas = " ".join(f"w{i} 0" for i in range(11))
    synset = parse_data_line(f"00000001 00 n 0b {lemmas} 000 | a definition of eleven words  \n", "noun")
    assert len(synset.lemmas) == 11


def test_gloss_splits_into_definition_and_examples():
    assert split_gloss('a domestic dog; "the dog barked"; "a dog\'s life"') == (
        "a domestic dog",
        ("the dog barked", "a dog's life"),
    )
    assert split_gloss("only a definition; with a second clause") == ("only a definition; with a second clause", ())


def test_retrieval_synsets_drop_short_definitions_and_repeated_word_sides():
    make = lambda i, words, definition: Synset(f"n{i}", "noun", words, definition, ())  # noqa: E731
    synsets = [
        make(1, ("bank",), "a financial institution that accepts deposits"),
        make(2, ("bank",), "sloping land beside a body of water"),
        make(3, ("bank", "cant"), "a slope in the turn of a road"),
        make(4, ("x",), "too short"),
    ]
    assert [s.id for s in retrieval_synsets(synsets)] == ["n1", "n3"]


def test_split_is_deterministic_and_independent_of_the_subset():
    synsets = read_wordnet(SAMPLE)
    train, test = split_synsets(synsets, 0.25)
    assert len(train) + len(test) == len(synsets) and test and train
    _, test_of_half = split_synsets(synsets[::2], 0.25)
    assert {s.id for s in test_of_half} == {s.id for s in test} & {s.id for s in synsets[::2]}
    with pytest.raises(ValueError, match="test_fraction"):
        split_synsets(synsets, 1.0)


def test_definition_record_trains_the_lm_on_the_gloss_and_contrasts_the_words():
    synset = Synset("n1", "noun", ("chasm", "abysm"), "a deep opening in the earth's surface", ())
    example = RecordParser()(definition_record(synset))
    assert example.query.text == "chasm, abysm" and not example.query.has_visual
    assert example.positive.text == "a deep opening in the earth's surface"
    assert example.conversation[0]["content"][-1]["text"] == "Define the word chasm."
    assert example.conversation[1]["content"][-1]["text"] == synset.definition


def test_a_text_only_conversation_without_query_says_how_to_fix_it():
    record = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    with pytest.raises(RecordError, match="give it a 'query'"):
        RecordParser()(record)


def test_a_missing_database_names_the_package(tmp_path, monkeypatch):
    monkeypatch.delenv("WORDNET_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        find_wordnet_dir(tmp_path)
    monkeypatch.setenv("WORDNET_DIR", str(SAMPLE))
    assert find_wordnet_dir() == SAMPLE
