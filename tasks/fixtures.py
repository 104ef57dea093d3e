"""Offline stand-ins for the hub datasets: a few handwritten rows in exactly the hub's schema.

Used when a task's source resolves to offline (no network), and served as parquet by the tests
to exercise the online path end to end. They are NOT the real datasets: a handful of rows
(the same rows for every split) so that every stage runs with no network; scores on them mean
nothing, and chat_eval and the report card mark them as smoke tests. (Growing them to hundreds
of rows would still not make a score mean much: a CPU-sized model is at chance on real knowledge
questions, and handwritten rows would not be the benchmark anyway.) Rows include the real data's quirks: ARC questions with 3 or 5 choices and with
numeric labels, GSM8K answers with decimals, thousands separators in questions, and a step
without a calculator annotation, SmolTalk conversations with a leading system message.
"""

from __future__ import annotations

import copy

LABELS_4 = ["A", "B", "C", "D"]
NUMERIC_4 = ["1", "2", "3", "4"]

ARC_EASY = [
    {"id": "Mercury_7029645", "question": "Which of these is a renewable source of energy?",
     "choices": {"text": ["coal", "natural gas", "wind", "oil"], "label": LABELS_4}, "answerKey": "C"},
    {"id": "MCAS_2004_5_12", "question": "A student places a glass of ice water on a table. After a few minutes, drops of water form on the outside of the glass. Where did this water come from?",
     "choices": {"text": ["the ice inside the glass", "the air around the glass", "the table under the glass", "the glass itself"], "label": LABELS_4}, "answerKey": "B"},
    {"id": "NYSEDREGENTS_2010_4_7", "question": "Which tool should a student use to measure the mass of a rock?",
     "choices": {"text": ["balance", "ruler", "thermometer", "graduated cylinder"], "label": NUMERIC_4}, "answerKey": "1"},
    {"id": "Mercury_SC_401003", "question": "Which part of a plant takes in water from the soil?",
     "choices": {"text": ["roots", "flowers", "leaves"], "label": ["A", "B", "C"]}, "answerKey": "A"},
    {"id": "Mercury_7083685", "question": "What causes day and night on Earth?",
     "choices": {"text": ["Earth revolving around the Sun", "Earth rotating on its axis", "the Moon orbiting Earth", "the Sun rotating on its axis"], "label": LABELS_4}, "answerKey": "B"},
    {"id": "MDSA_2009_5_3", "question": "Which property of a mineral can be observed just by looking at it?",
     "choices": {"text": ["hardness", "color", "mass", "density"], "label": LABELS_4}, "answerKey": "B"},
]

ARC_CHALLENGE = [
    {"id": "Mercury_7211418", "question": "A scientist repeats an experiment several times and gets similar results each time. Why is repeating the experiment important?",
     "choices": {"text": ["It makes the results more reliable.", "It changes the hypothesis.", "It removes the need for a control.", "It makes the experiment faster."], "label": LABELS_4}, "answerKey": "A"},
    {"id": "Mercury_SC_409142", "question": "Which change would most likely cause a population of rabbits in a meadow to decrease?",
     "choices": {"text": ["an increase in rainfall", "an increase in the number of foxes", "a decrease in the number of hawks", "an increase in grass growth"], "label": LABELS_4}, "answerKey": "B"},
    {"id": "MCAS_2012_8_23641", "question": "A ball rolls down a ramp and across the floor until it stops. Which force causes the ball to stop?",
     "choices": {"text": ["gravity", "magnetism", "friction", "buoyancy"], "label": LABELS_4}, "answerKey": "C"},
    {"id": "AKDE&ED_2008_4_26", "question": "Which process in the water cycle turns water vapor into liquid water?",
     "choices": {"text": ["evaporation", "condensation", "precipitation", "runoff", "transpiration"], "label": ["A", "B", "C", "D", "E"]}, "answerKey": "B"},
    {"id": "NYSEDREGENTS_2013_8_21", "question": "Which layer of Earth is made mostly of liquid iron and nickel?",
     "choices": {"text": ["crust", "mantle", "outer core", "inner core"], "label": NUMERIC_4}, "answerKey": "3"},
    {"id": "Mercury_7016433", "question": "When sodium reacts with chlorine, the product is table salt. Which statement describes this change?",
     "choices": {"text": ["It is a physical change because the state changes.", "It is a chemical change because a new substance forms.", "It is a physical change because no energy is involved.", "It is a chemical change because the mass decreases."], "label": LABELS_4}, "answerKey": "B"},
]

MMLU_ALL = [
    {"question": "Find the order of the element 3 in the additive group Z_12.", "subject": "abstract_algebra",
     "choices": ["3", "4", "6", "12"], "answer": 1},
    {"question": "Which organelle is the main site of cellular respiration in eukaryotic cells?", "subject": "high_school_biology",
     "choices": ["ribosome", "mitochondrion", "Golgi apparatus", "lysosome"], "answer": 1},
    {"question": "Which document begins with the words 'We the People'?", "subject": "high_school_us_history",
     "choices": ["the Declaration of Independence", "the Articles of Confederation", "the Constitution of the United States", "the Bill of Rights"], "answer": 2},
    {"question": "What is the worst-case time complexity of binary search on a sorted array of n elements?", "subject": "college_computer_science",
     "choices": ["O(1)", "O(log n)", "O(n)", "O(n log n)"], "answer": 1},
    {"question": "What is the pH of a 0.001 M solution of hydrochloric acid?", "subject": "high_school_chemistry",
     "choices": ["1", "2", "3", "11"], "answer": 2},
    {"question": "Which philosopher wrote the Critique of Pure Reason?", "subject": "philosophy",
     "choices": ["David Hume", "Immanuel Kant", "John Locke", "René Descartes"], "answer": 1},
    {"question": "What is 15% of 80?", "subject": "elementary_mathematics",
     "choices": ["8", "10", "12", "15"], "answer": 2},
    {"question": "Which planet in our solar system has the shortest orbital period?", "subject": "astronomy",
     "choices": ["Mercury", "Venus", "Mars", "Neptune"], "answer": 0},
    {"question": "If the central bank raises interest rates, what is the most likely short-run effect?", "subject": "high_school_macroeconomics",
     "choices": ["investment spending rises", "borrowing becomes cheaper", "aggregate demand falls", "the money supply grows faster"], "answer": 2},
]

GSM8K_MAIN = [
    {"question": "Maya bakes 36 cookies. She gives a third of them to her neighbors and eats 4. How many cookies does she have left?",
     "answer": "Maya gives away 36/3 = <<36/3=12>>12 cookies.\nAfter eating 4, she has 36 - 12 - 4 = <<36-12-4=20>>20 cookies left.\n#### 20"},
    {"question": "A store sells pencils in packs of 12 for $3 a pack. Leo needs 60 pencils. How much will he spend?",
     "answer": "Leo needs 60/12 = <<60/12=5>>5 packs.\nHe will spend 5 * 3 = $<<5*3=15>>15.\n#### 15"},
    {"question": "Priya runs 2.5 miles every weekday and 4 miles on Saturday. How many miles does she run in a week?",
     "answer": "On weekdays she runs 2.5 * 5 = <<2.5*5=12.5>>12.5 miles.\nIn total she runs 12.5 + 4 = <<12.5+4=16.5>>16.5 miles.\n#### 16.5"},
    {"question": "A school has 1,200 students. 45% of them take the bus. How many students do not take the bus?",
     "answer": "1200 * 0.45 = <<1200*0.45=540>>540 students take the bus.\nSo 1200 - 540 = <<1200-540=660>>660 students do not.\n#### 660"},
    {"question": "Tom has $50. He buys 3 books at $8 each and a pen for $2. How much money does he have left?",
     "answer": "The books cost 3 * 8 = $<<3*8=24>>24.\nHe spends 24 + 2 = $<<24+2=26>>26 in total.\nHe has 50 - 26 = $<<50-26=24>>24 left.\n#### 24"},
    {"question": "A factory makes 1,250 toys a day. How many toys does it make in 30 days?",
     "answer": "It makes 1250 * 30 = <<1250*30=37500>>37500 toys.\n#### 37500"},
    {"question": "Ana is 3 years older than Ben. Ben is 9 years old. How old will Ana be in 5 years?",
     "answer": "Ana is 9 + 3 = 12 years old.\nIn 5 years she will be 12 + 5 = <<12+5=17>>17 years old.\n#### 17"},
]

SMOLTALK = [
    {"messages": [
        {"role": "user", "content": "What is the difference between weather and climate?"},
        {"role": "assistant", "content": "Weather is the state of the atmosphere at a particular place and time: today's rain, tomorrow's wind. Climate is the pattern of weather in a region averaged over many years, usually 30 or more. Weather tells you whether to bring an umbrella today; climate tells you whether to own one."},
    ]},
    {"messages": [
        {"role": "system", "content": "You are a concise assistant that answers in one or two sentences."},
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": "Air molecules scatter short blue wavelengths of sunlight much more strongly than long red ones, so blue light reaches your eyes from every direction of the sky."},
    ]},
    {"messages": [
        {"role": "user", "content": "Write a Python function that reverses a string."},
        {"role": "assistant", "content": "Here is a simple version using slicing:\n\n```python\ndef reverse_string(s: str) -> str:\n    return s[::-1]\n```\n\nThe slice `[::-1]` walks the string from the end to the start with a step of -1."},
        {"role": "user", "content": "Can you do it without slicing?"},
        {"role": "assistant", "content": "Sure, you can join the characters from `reversed`:\n\n```python\ndef reverse_string(s: str) -> str:\n    return \"\".join(reversed(s))\n```"},
    ]},
    {"messages": [
        {"role": "user", "content": "Give me three tips for staying focused while studying."},
        {"role": "assistant", "content": "1. Put your phone in another room so notifications cannot pull you away.\n2. Work in short blocks, such as 25 minutes, followed by a 5 minute break.\n3. Decide before you start exactly what you want to finish in the session."},
    ]},
    {"messages": [
        {"role": "system", "content": "You are a friendly tutor for beginners."},
        {"role": "user", "content": "What is a prime number?"},
        {"role": "assistant", "content": "A prime number is a whole number greater than 1 whose only divisors are 1 and itself. For example, 7 is prime, but 8 is not, because 8 = 2 x 4."},
        {"role": "user", "content": "Is 1 a prime number?"},
        {"role": "assistant", "content": "No. By definition a prime must be greater than 1. Leaving 1 out keeps every whole number's factorization into primes unique."},
    ]},
]

# (dataset id, config) -> rows; the same rows serve every split.
OFFLINE_ROWS: dict[tuple[str, str], list[dict]] = {
    ("allenai/ai2_arc", "ARC-Easy"): ARC_EASY,
    ("allenai/ai2_arc", "ARC-Challenge"): ARC_CHALLENGE,
    ("cais/mmlu", "all"): MMLU_ALL,
    ("cais/mmlu", "auxiliary_train"): [{"train": row} for row in MMLU_ALL],  # the hub nests these rows
    ("openai/gsm8k", "main"): GSM8K_MAIN,
    ("HuggingFaceTB/smol-smoltalk", "default"): SMOLTALK,
}


def offline_rows(dataset_id: str, config: str) -> list[dict]:
    """A fresh copy of the stand-in rows (callers may change them)."""
    if (dataset_id, config) not in OFFLINE_ROWS:
        known = ", ".join(f"{d} {c}" for d, c in OFFLINE_ROWS)
        raise ValueError(f"no offline stand-in for {dataset_id} config {config!r} (have: {known}); use source='online'")
    return copy.deepcopy(OFFLINE_ROWS[(dataset_id, config)])
