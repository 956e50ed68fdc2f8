"""Streaming detokenization and stop sequences."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from server.engine.detokenizer import IncrementalDetokenizer, StopChecker


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


TEXTS = ["Hello, world!", "naïve café — 東京タワー 🚀🎉 done", "日本語のテキスト", "  spaced\n\ttabs"]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_is_whole_utf8_and_complete(tokenizer, text):
    prompt = tokenizer("prefix: ")["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids)


def test_multibyte_character_waits_for_its_last_byte(tokenizer):
    ids = tokenizer("🚀", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1  # byte-level BPE splits the emoji
    detok = IncrementalDetokenizer(tokenizer, [])
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1]) == "🚀"


def test_stop_checker_holds_back_a_possible_stop_and_cuts_at_it():
    checker = StopChecker(("STOP",))
    assert checker.add("abc S") == "abc "
    assert checker.add("T") == ""
    assert checker.add("x") == "STx"
    assert checker.add("yy ST") == "yy "
    assert checker.add("OP and more") == ""
    assert checker.matched == "STOP"
    assert checker.text == "abc STxyy "


def test_stop_checker_without_stops_emits_everything():
    checker = StopChecker(())
    assert checker.add("abc") == "abc"
    assert checker.finish() == ""
