"""Synthetic arithmetic word problems solved with calculator calls, like GSM8K but generated.

Each problem is a small story with 1-3 calculations. The solution is written in GSM8K's own
annotation format ("3 * 8 = <<3*8=24>>24") and converted by the same code as GSM8K, so the
assistant learns the same tool-call pattern and answer marker ("#### 24"), and is scored the
same way. Every expression uses only + - * // on integers, so the Python tool prints exactly
the result written after it. Deterministic: example i depends only on (seed, split, i).
"""

from __future__ import annotations

import random

from tasks.common import Conversation, SyntheticTask, evaluate_final_answer
from tasks.gsm8k import math_conversation

NAMES = ("Sam", "Maya", "Leo", "Priya", "Tom", "Ana", "Kenji", "Zoe", "Omar", "Lena")
ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "cards", "shells", "stamps")
GOODS = ("notebooks", "toy cars", "comic books", "bracelets", "plants")
EXTRAS = ("pen", "snack", "bookmark", "bottle of water")


def calc(expr: str, value: int) -> str:
    """One annotated calculation, "3*8 = <<3*8=24>>24"; `value` must be what Python gives."""
    return f"{expr} = <<{expr}={value}>>{value}"


def bags(rng: random.Random) -> tuple[str, list[str], int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    have, num_bags, per_bag = rng.randint(2, 30), rng.randint(2, 9), rng.randint(2, 12)
    bought = num_bags * per_bag
    total = have + bought
    question = f"{name} has {have} {item} and buys {num_bags} bags with {per_bag} {item} in each. How many {item} does {name} have now?"
    return question, [f"The bags hold {calc(f'{num_bags}*{per_bag}', bought)} {item}.", f"{name} now has {calc(f'{have}+{bought}', total)} {item}."], total


def wages(rng: random.Random) -> tuple[str, list[str], int]:
    name = rng.choice(NAMES)
    rate, hours, days = rng.randint(8, 30), rng.randint(2, 8), rng.randint(2, 7)
    daily = rate * hours
    total = daily * days
    question = f"{name} earns ${rate} per hour and works {hours} hours a day for {days} days. How many dollars does {name} earn in total?"
    return question, [f"Each day {name} earns {calc(f'{rate}*{hours}', daily)} dollars.", f"Over {days} days that is {calc(f'{daily}*{days}', total)} dollars."], total


def sharing(rng: random.Random) -> tuple[str, list[str], int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each = rng.randint(2, 9), rng.randint(2, 15)
    total = friends * each
    question = f"{name} shares {total} {item} equally among {friends} friends. How many {item} does each friend get?"
    return question, [f"Each friend gets {calc(f'{total}//{friends}', each)} {item}."], each


def shopping(rng: random.Random) -> tuple[str, list[str], int]:
    name, goods, extra = rng.choice(NAMES), rng.choice(GOODS), rng.choice(EXTRAS)
    count, price, extra_price = rng.randint(2, 5), rng.randint(2, 15), rng.randint(1, 10)
    cost = count * price
    spent = cost + extra_price
    money = spent + rng.randint(0, 40)
    left = money - spent
    question = f"{name} has ${money}. {name} buys {count} {goods} at ${price} each and a {extra} for ${extra_price}. How many dollars does {name} have left?"
    steps = [f"The {goods} cost {calc(f'{count}*{price}', cost)} dollars.", f"In total {name} spends {calc(f'{cost}+{extra_price}', spent)} dollars.",
             f"{name} has {calc(f'{money}-{spent}', left)} dollars left."]
    return question, steps, left


def reading(rng: random.Random) -> tuple[str, list[str], int]:
    name = rng.choice(NAMES)
    monday, wednesday = rng.randint(5, 40), rng.randint(3, 30)
    tuesday = monday * 2
    total = monday + tuesday + wednesday
    question = f"{name} reads {monday} pages on Monday, twice as many on Tuesday, and {wednesday} pages on Wednesday. How many pages does {name} read in total?"
    return question, [f"On Tuesday {name} reads {calc(f'{monday}*2', tuesday)} pages.", f"In total that is {calc(f'{monday}+{tuesday}+{wednesday}', total)} pages."], total


def travel(rng: random.Random) -> tuple[str, list[str], int]:
    speed1, hours1, speed2, hours2 = rng.randint(30, 90), rng.randint(1, 5), rng.randint(30, 90), rng.randint(1, 5)
    dist1, dist2 = speed1 * hours1, speed2 * hours2
    total = dist1 + dist2
    question = f"A train travels at {speed1} km/h for {hours1} hours and then at {speed2} km/h for {hours2} hours. How many kilometers does it travel in total?"
    steps = [f"First it covers {calc(f'{speed1}*{hours1}', dist1)} km.", f"Then it covers {calc(f'{speed2}*{hours2}', dist2)} km.",
             f"Altogether {calc(f'{dist1}+{dist2}', total)} km."]
    return question, steps, total


def discount(rng: random.Random) -> tuple[str, list[str], int]:
    goods = rng.choice(GOODS)
    price, percent = 20 * rng.randint(1, 10), rng.choice((5, 10, 15, 20, 25, 50))
    off = price * percent // 100  # exact: price is a multiple of 20
    sale = price - off
    question = f"A set of {goods} costs ${price}. It is on sale for {percent}% off. What is the sale price in dollars?"
    return question, [f"The discount is {calc(f'{price}*{percent}//100', off)} dollars.", f"The sale price is {calc(f'{price}-{off}', sale)} dollars."], sale


PROBLEMS = (bags, wages, sharing, shopping, reading, travel, discount)


class Arithmetic(SyntheticTask):
    eval_type = "generative"

    def get_example(self, index: int) -> Conversation:
        rng = self.rng(index)
        question, steps, answer = rng.choice(PROBLEMS)(rng)
        return math_conversation(question, "\n".join(steps) + f"\n#### {answer}")

    def evaluate(self, conversation: Conversation, assistant_response: str) -> bool:
        return evaluate_final_answer(conversation, assistant_response)
