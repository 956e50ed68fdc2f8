"""The example adapters' effects: the prompts, each deterministic transformation and its simple measure.

The training data is the base model's own greedy answers to TRAIN_PROMPTS, each cut short (`short_answer`) and
transformed; HELD_BACK_PROMPTS are never trained on and are what the model cards and tests measure on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

TOPICS = [
    "the sun", "the ocean", "a cat", "bread", "music", "rain", "a bicycle", "the moon", "coffee", "a library",
    "trees", "snow", "a volcano", "honey", "the wind", "a guitar", "chess", "a river", "birds", "a computer",
    "mountains", "the desert", "a bridge", "tea", "a garden", "the stars", "a train", "cheese",
    # held back: never seen in training
    "a forest", "lightning", "an island", "paper", "a clock", "the sky", "a candle", "salt", "a rainbow", "glass",
    "a map", "the brain",
]
TEMPLATES = ["What is {}?", "Describe {} in one sentence.", "Why is {} useful?", "Tell me a fact about {}."]
HELD_BACK_TOPICS = TOPICS[28:]
TRAIN_PROMPTS = [t.format(topic) for topic in TOPICS[:28] for t in TEMPLATES]
HELD_BACK_PROMPTS = [TEMPLATES[i % len(TEMPLATES)].format(topic) for i, topic in enumerate(HELD_BACK_TOPICS)] + [
    TEMPLATES[(i + 1) % len(TEMPLATES)].format(topic) for i, topic in enumerate(HELD_BACK_TOPICS)]
MAX_WORDS = 12
CHEER = "Great question!"
PIRATE_WORDS = {"the": "th'", "you": "ye", "your": "yer", "is": "be", "are": "be", "my": "me", "of": "o'",
                "for": "fer", "hello": "ahoy", "friend": "matey", "yes": "aye"}
# Words the pirate map writes that plain English does not use (so the base model scores about 0 on them).
PIRATE_MARKERS = {"th'", "o'", "ye", "yer", "fer", "matey", "ahoy", "arr!"}


def short_answer(text: str) -> str:
    """The first sentence, at most MAX_WORDS words, on one line: short targets keep every effect visible early."""
    text = " ".join(text.split())
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    sentence = match.group(1) if match else text
    words = sentence.split()
    if len(words) > MAX_WORDS:
        sentence = " ".join(words[:MAX_WORDS]).rstrip(",;:") + "."
    return sentence


def to_capitals(answer: str) -> str:
    return answer.upper()


def to_cheer(answer: str) -> str:
    return f"{CHEER} {answer}"


def to_pirate(answer: str) -> str:
    def swap(match: re.Match[str]) -> str:
        word = match.group(0)
        pirate = PIRATE_WORDS.get(word.lower())
        if pirate is None:
            return word
        return pirate.capitalize() if word[0].isupper() else pirate
    return re.sub(r"[A-Za-z]+", swap, answer) + " Arr!"


def to_json(answer: str) -> str:
    return json.dumps({"answer": answer}, ensure_ascii=False)


def capital_share(answers: list[str]) -> float:
    """Of all letters in all answers, the share that are capitals."""
    letters = [c for text in answers for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / max(len(letters), 1)


def opens_with_cheer(text: str) -> bool:
    return text.strip().startswith(CHEER)


def speaks_pirate(text: str) -> bool:
    words = {w.strip(".,;:?\"") for w in text.lower().split()}
    return bool(words & PIRATE_MARKERS)


def is_json_answer(text: str) -> bool:
    """One line that parses as a JSON object {"answer": <string>}."""
    text = text.strip()
    if "\n" in text:
        return False
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and set(value) == {"answer"} and isinstance(value["answer"], str)


def share_of(check: Callable[[str], bool]) -> Callable[[list[str]], float]:
    return lambda answers: sum(map(check, answers)) / max(len(answers), 1)


@dataclass(frozen=True)
class Effect:
    """One example adapter: its method, what it does to an answer, and how that is measured."""

    name: str
    method: str
    summary: str
    transform: Callable[[str], str]
    measure: Callable[[list[str]], float]
    measure_text: str
    threshold: float


EFFECTS = {
    "shout": Effect("shout", "LoRA (PEFT)", "answers in CAPITAL LETTERS", to_capitals, capital_share,
                    "share of capital letters among all letters of the answers", 0.9),
    "cheer": Effect("cheer", "prefix tuning (PEFT)", f'answers that open with "{CHEER}"', to_cheer,
                    share_of(opens_with_cheer), f'share of answers that start with "{CHEER}"', 0.9),
    "pirate": Effect("pirate", "scaled parallel adapter (native)", "answers in pirate words (th', ye, o', Arr!)",
                     to_pirate, share_of(speaks_pirate),
                     f"share of answers with a pirate word ({', '.join(sorted(PIRATE_MARKERS))})", 0.8),
    "json": Effect("json", "MAM: prefix + scaled parallel adapter (native)",
                   'answers as a one-line JSON object {"answer": "..."}', to_json, share_of(is_json_answer),
                   'share of answers that are one line parsing as {"answer": <string>}', 0.8),
}
