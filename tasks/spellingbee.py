"""Synthetic spelling tasks: counting letters in a word, and spelling a word out.

Small models see tokens, not letters, so "how many r in strawberry" is hard for them. These
tasks teach the two halves: SimpleSpelling maps a word to its letters ("s,t,r,a,..."), and
SpellingBee counts a letter by spelling the word out, tallying, and checking with a Python
tool call (`'strawberry'.count('r')`), ending with "#### 3" like GSM8K.

Words come from /usr/share/dict/words (Debian `wamerican`) when present, else from the
Python installation's own documentation (`pydoc_data.topics`); either way the list is sorted,
so examples are a deterministic function of (seed, split, index) on a given machine.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

from tasks.common import Conversation, SyntheticTask, evaluate_final_answer

DICT_WORDS = Path("/usr/share/dict/words")
# how often the asked letter is drawn from the word itself (else any letter: answers of 0)
LETTER_FROM_WORD_P = 0.9

COUNT_TEMPLATES = (
    "How many {letter} are in the word {word}?",
    "How many '{letter}'s are in '{word}'?",
    "How many times does the letter {letter} appear in {word}?",
    'Count the number of "{letter}" in "{word}".',
    "In the word {word}, how many {letter}'s are there?",
    "how many {letter} in {word}",
    "Can you tell me how many times '{letter}' occurs in the word '{word}'?",
    "What is the count of the letter {letter} in {word}?",
)
SPELL_TEMPLATES = (
    "Spell the word: {word}",
    "How do you spell {word}?",
    "Spell {word} letter by letter.",
    "Can you spell '{word}' for me?",
    'Spell out "{word}".',
    "spell {word}",
)


def load_words(path: Path = DICT_WORDS) -> list[str]:
    """Sorted distinct lowercase words (letters a-z only) from `path`, else Python's docs."""
    if path.is_file():
        words = re.findall(r"^[a-z]{3,15}$", path.read_text(encoding="utf-8", errors="ignore"), re.MULTILINE)
    else:
        from pydoc_data.topics import topics

        words = re.findall(r"\b[a-z]{3,12}\b", "\n".join(topics.values()))
    if not words:
        raise ValueError(f"no words found in {path} nor in pydoc_data.topics")
    return sorted(set(words))


def spelled(word: str) -> str:
    return ",".join(word)


class SyntheticWordTask(SyntheticTask):
    eval_type = "generative"

    def __init__(self, size: int = 1000, split: str = "train", seed: int = 42,
                 start: int = 0, stop: int | None = None, step: int = 1) -> None:
        super().__init__(size, split, seed, start, stop, step)
        self.words = load_words()


class SpellingBee(SyntheticWordTask):
    """How many times does a letter occur in a word? Final answer "#### N"."""

    def get_example(self, index: int) -> Conversation:
        rng = self.rng(index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < LETTER_FROM_WORD_P else rng.choice(string.ascii_lowercase)
        shown_letter = letter.upper() if rng.random() < 0.3 else letter
        question = rng.choice(COUNT_TEMPLATES).format(letter=shown_letter, word=word)
        count = word.count(letter)
        positions = [i + 1 for i, ch in enumerate(word) if ch == letter]
        if positions:
            tally = f"Counting '{letter}': " + ", ".join(f"position {p} makes {n}" for n, p in enumerate(positions, 1)) + "."
        else:
            tally = f"None of these letters is '{letter}', so the count is 0."
        times = "time" if count == 1 else "times"
        parts = [
            {"type": "text", "text": f"Let me spell '{word}' out and count the '{letter}'s.\n\n{word}: {spelled(word)}\n\n{tally}\n\nLet me check with Python:\n\n"},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nBoth agree: '{letter}' appears {count} {times} in '{word}'.\n\n#### {count}"},
        ]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}

    def evaluate(self, conversation: Conversation, assistant_response: str) -> bool:
        return evaluate_final_answer(conversation, assistant_response)


class SimpleSpelling(SyntheticWordTask):
    """Spell a word: the answer is its letters separated by commas ("s,t,r,a,w")."""

    def get_example(self, index: int) -> Conversation:
        rng = self.rng(index)
        word = rng.choice(self.words)
        question = rng.choice(SPELL_TEMPLATES).format(word=word)
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": spelled(word)}]}

    def evaluate(self, conversation: Conversation, assistant_response: str) -> bool:
        """Right when the letters match, ignoring case, spaces and a final period."""
        normalized = re.sub(r"\s+", "", assistant_response.lower()).rstrip(".")
        return normalized == conversation["messages"][-1]["content"]
