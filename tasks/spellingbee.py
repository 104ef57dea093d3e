"""Synthetic spelling tasks: counting letters in a word, and spelling a word out.

Small models see tokens, not letters, so "how many r in strawberry" is hard for them. SpellingBee
hands the counting to the Python tool: the reply is one call, ` 'strawberry'.count('r')`, then
the tool's result after GSM8K's answer marker ("#### 3"). The question quotes the word after a
space (" 'strawberry'") and the call starts with a space, so the word is the same tokens in both:
the model's job is to copy it. SimpleSpelling maps a word
to its letters ("s,t,r,a,...").

Words come from /usr/share/dict/words (Debian `wamerican`) when present, else from the
Python installation's own documentation (`pydoc_data.topics`); either way the list is sorted.
Held out by construction: a word whose CRC32 is divisible by TEST_BUCKETS is a test word, any
other a train word, so the test split asks only about words no training example uses. Examples
are a deterministic function of (seed, split, index) on a given machine.
"""

from __future__ import annotations

import re
import string
import zlib
from pathlib import Path

from tasks.common import Conversation, SyntheticTask, evaluate_final_answer

DICT_WORDS = Path("/usr/share/dict/words")
TEST_BUCKETS = 10  # about 1 word in 10 is a test word
# how often the asked letter is drawn from the word itself (else any letter: answers of 0)
LETTER_FROM_WORD_P = 0.9

# Every template quotes the word after a space and only the word, so the call's " '" points at
# it alone; the letter is bare (" r"), its one-token form in the call ("r") is learnt per letter.
COUNT_TEMPLATES = (
    "How many {letter} are in '{word}'?",
    "How many times does the letter {letter} appear in '{word}'?",
    "Count the number of {letter} in '{word}'.",
    "In the word '{word}', how many {letter} are there?",
    "how many {letter} in '{word}'",
    "Can you tell me how many times {letter} occurs in the word '{word}'?",
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


def split_of_word(word: str) -> str:
    """"test" for about 1 word in TEST_BUCKETS (by CRC32, the same on every machine), else "train"."""
    return "test" if zlib.crc32(word.encode()) % TEST_BUCKETS == 0 else "train"


def spelled(word: str) -> str:
    return ",".join(word)


class SyntheticWordTask(SyntheticTask):
    eval_type = "generative"

    def __init__(self, size: int = 1000, split: str = "train", seed: int = 42,
                 start: int = 0, stop: int | None = None, step: int = 1) -> None:
        super().__init__(size, split, seed, start, stop, step)
        self.words = [word for word in load_words() if split_of_word(word) == split]  # this split's words only


class SpellingBee(SyntheticWordTask):
    """How many times does a letter occur in a word? Final answer "#### N"."""

    def get_example(self, index: int) -> Conversation:
        rng = self.rng(index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < LETTER_FROM_WORD_P else rng.choice(string.ascii_lowercase)
        question = rng.choice(COUNT_TEMPLATES).format(letter=letter, word=word)
        count = word.count(letter)
        parts = [
            {"type": "python", "text": f" '{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\n#### {count}"},
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
