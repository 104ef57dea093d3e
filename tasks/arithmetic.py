"""Synthetic arithmetic word problems solved with one calculator call, scored like GSM8K.

Each problem is a small story with 1-3 calculations. The reply is one tool call holding the whole
computation with the question's numbers in the order the question gives them, then the tool's
result after GSM8K's answer marker:

    user:      Sam has 12 apples and buys 3 bags with 4 apples in each. How many apples ...?
    assistant: <|python_start|>12+3*4<|python_end|><|output_start|>24<|output_end|>\\n\\n#### 24

The model's job is to pick the operations from the story and copy its numbers (numbers tokenize
the same in the question and in the call: 1-2 digit chunks); the calculator does the arithmetic.
Every expression uses only + - * // and parentheses on integers, so the tool prints exactly the
answer. Scored by the final `#### N`, as GSM8K.

Held out by construction: a problem's key is its kind and its expression (which holds all its
numbers); a key whose CRC32 is divisible by TEST_BUCKETS belongs to the test split, any other
to train. Each split draws from its RNG until the key is its own, so no test problem shares its
kind and numbers with any training problem, whatever the sizes and seeds. Deterministic:
example i depends only on (seed, split, i).
"""

from __future__ import annotations

import random
import zlib

from tasks.common import Conversation, SyntheticTask, evaluate_final_answer

TEST_BUCKETS = 10  # about 1 key in 10 is a test problem

NAMES = ("Sam", "Maya", "Leo", "Priya", "Tom", "Ana", "Kenji", "Zoe", "Omar", "Lena")
ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "cards", "shells", "stamps")
GOODS = ("notebooks", "toy cars", "comic books", "bracelets", "plants")
EXTRAS = ("pen", "snack", "bookmark", "bottle of water")


def bags(rng: random.Random) -> tuple[str, str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    have, num_bags, per_bag = rng.randint(2, 30), rng.randint(2, 9), rng.randint(2, 12)
    question = f"{name} has {have} {item} and buys {num_bags} bags with {per_bag} {item} in each. How many {item} does {name} have now?"
    return question, f"{have}+{num_bags}*{per_bag}", have + num_bags * per_bag


def wages(rng: random.Random) -> tuple[str, str, int]:
    name = rng.choice(NAMES)
    rate, hours, days = rng.randint(8, 30), rng.randint(2, 8), rng.randint(2, 7)
    question = f"{name} earns ${rate} per hour and works {hours} hours a day for {days} days. How many dollars does {name} earn in total?"
    return question, f"{rate}*{hours}*{days}", rate * hours * days


def sharing(rng: random.Random) -> tuple[str, str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each = rng.randint(2, 9), rng.randint(2, 15)
    total = friends * each
    question = f"{name} shares {total} {item} equally among {friends} friends. How many {item} does each friend get?"
    return question, f"{total}//{friends}", each


def shopping(rng: random.Random) -> tuple[str, str, int]:
    name, goods, extra = rng.choice(NAMES), rng.choice(GOODS), rng.choice(EXTRAS)
    count, price, extra_price = rng.randint(2, 5), rng.randint(2, 15), rng.randint(1, 10)
    spent = count * price + extra_price
    money = spent + rng.randint(0, 40)
    question = f"{name} has ${money}. {name} buys {count} {goods} at ${price} each and a {extra} for ${extra_price}. How many dollars does {name} have left?"
    return question, f"{money}-({count}*{price}+{extra_price})", money - spent


def reading(rng: random.Random) -> tuple[str, str, int]:
    name = rng.choice(NAMES)
    monday, wednesday = rng.randint(5, 40), rng.randint(3, 30)
    question = f"{name} reads {monday} pages on Monday, twice as many on Tuesday, and {wednesday} pages on Wednesday. How many pages does {name} read in total?"
    return question, f"{monday}+{monday}*2+{wednesday}", monday * 3 + wednesday


def travel(rng: random.Random) -> tuple[str, str, int]:
    speed1, hours1, speed2, hours2 = rng.randint(30, 90), rng.randint(1, 5), rng.randint(30, 90), rng.randint(1, 5)
    question = f"A train travels at {speed1} km/h for {hours1} hours and then at {speed2} km/h for {hours2} hours. How many kilometers does it travel in total?"
    return question, f"{speed1}*{hours1}+{speed2}*{hours2}", speed1 * hours1 + speed2 * hours2


def discount(rng: random.Random) -> tuple[str, str, int]:
    goods = rng.choice(GOODS)
    price, percent = 20 * rng.randint(1, 10), rng.choice((5, 10, 15, 20, 25, 50))
    question = f"A set of {goods} costs ${price}. It is on sale for {percent}% off. What is the sale price in dollars?"
    return question, f"{price}-{price}*{percent}//100", price - price * percent // 100  # exact: price is a multiple of 20


PROBLEMS = (bags, wages, sharing, shopping, reading, travel, discount)


def split_of_key(key: str) -> str:
    """"test" for about 1 key in TEST_BUCKETS (by CRC32, the same on every machine), else "train"."""
    return "test" if zlib.crc32(key.encode()) % TEST_BUCKETS == 0 else "train"


class Arithmetic(SyntheticTask):
    eval_type = "generative"

    def problem(self, index: int) -> tuple[str, str, str, int]:
        """(kind, question, expression, answer) of example `index`: the first draw whose key is
        this split's (see the module docstring)."""
        rng = self.rng(index)
        while True:
            make = rng.choice(PROBLEMS)
            question, expression, answer = make(rng)
            if split_of_key(f"{make.__name__}|{expression}") == self.split:
                return make.__name__, question, expression, answer

    def get_example(self, index: int) -> Conversation:
        _, question, expression, answer = self.problem(index)
        parts = [{"type": "python", "text": expression}, {"type": "python_output", "text": str(answer)},
                 {"type": "text", "text": f"\n\n#### {answer}"}]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}

    def evaluate(self, conversation: Conversation, assistant_response: str) -> bool:
        return evaluate_final_answer(conversation, assistant_response)
