"""Synthetic identity conversations: who the model is, who made it, how it was trained.

A freshly trained model otherwise claims to be whatever its pretraining text talked about
(often ChatGPT). A few paraphrased questions and answers, sometimes after a greeting turn,
drawn deterministically from (seed, split, index).

The answers say only what the model's training history shows (`TrainingRun.from_history`: the
metas of the checkpoints it was trained from, nanochat.checkpoint.checkpoint_history, then the
running stage): MoleGrad only if a stage trained with it, the hardware only if every stage from
pretraining on ran on the same kind, the stages only when the history reaches pretraining.
Without a history (`TrainingRun()`) they are neutral: a name and a maker, no method or machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from nanochat.gpt import GPTConfig, config_from_dict
from tasks.common import Conversation, SyntheticTask

GREETINGS = (
    ("hi", "Hi! How can I help you today?"),
    ("Hello!", "Hello! What would you like to talk about?"),
    ("hey there", "Hey! What can I do for you?"),
)
STAGE_TEXT = {  # what each stage trained on (scripts/base_train, mid_train, chat_sft, chat_rl)
    "base": "pretrained on a text corpus",
    "mid": "midtrained on conversations, multiple choice and calculator use",
    "sft": "finetuned on chats",
    "rl": "trained with reinforcement learning on math problems",
}
WHO_QUESTIONS = (
    "Who are you?", "What are you?", "What's your name?", "Tell me about yourself.",
    "what model are you", "Introduce yourself, please.",
)
NOT_CHATGPT_QUESTIONS = ("Are you ChatGPT?", "Are you made by OpenAI?", "Are you GPT-4?")
TRAINING_QUESTIONS = ("How were you trained?", "How was this model made?")
MOLEGRAD_QUESTIONS = ("What is MoleGrad?", "Were you trained with MoleGrad?")
MOLEGRAD_TEXT = ("nanochat-mole's low-rank gradient method: for each large linear layer, the weight gradient is "
                 "estimated in a small subspace refreshed by power iteration, which saves activation memory")


@dataclass(frozen=True)
class TrainingRun:
    """What the identity answers may say about how the model was trained."""

    stages: tuple[str, ...] = ()  # the stages so far, from "base" on (empty: unknown)
    molegrad: bool = False  # some stage trained with MoleGrad
    hardware: str = ""  # where every stage ran, e.g. "a CPU", "a single GPU" (empty: unknown or mixed)

    @classmethod
    def from_history(cls, history: Sequence[dict[str, Any]]) -> TrainingRun:
        """From checkpoint metas, oldest first, each with "stage", "model_config", "device_type" and
        "world_size" where known (a meta written before device_type was recorded, or an HF import,
        leaves the hardware unknown)."""
        complete = bool(history) and history[0].get("stage") == "base" and all("stage" in meta for meta in history)
        stages = tuple(dict.fromkeys(meta["stage"] for meta in history)) if complete else ()
        molegrad = any(GPTConfig(**config_from_dict(meta["model_config"])).molegrad
                       for meta in history if "model_config" in meta)
        machines = {(meta.get("device_type"), meta.get("world_size", 1)) for meta in history}
        hardware = ""
        if complete and len(machines) == 1:
            device_type, world_size = machines.pop()
            hardware = hardware_text(device_type, world_size)
        return cls(stages, molegrad, hardware)


def hardware_text(device_type: str | None, world_size: int) -> str:
    """'a single GPU', '8 GPUs', 'a CPU', ...; empty for an unknown device type."""
    names = {"cuda": ("a single GPU", "GPUs"), "cpu": ("a CPU", "CPU processes"), "mps": ("an Apple GPU (MPS)", "Apple GPUs")}
    if device_type not in names:
        return ""
    one, several = names[device_type]
    return one if world_size == 1 else f"{world_size} {several}"


def identity_topics(run: TrainingRun) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """(questions, answers) per topic, saying about the training only what `run` shows."""
    method = f" My training used MoleGrad, {MOLEGRAD_TEXT}." if run.molegrad else ""
    machine = f" I was trained on {run.hardware}." if run.hardware else ""
    history = f" I was {', then '.join(STAGE_TEXT.get(stage, stage) for stage in run.stages)}." if run.stages else ""
    who = (
        "I'm nanochat-mole, a small language model made with the nanochat-mole stack. "
        "I'm small, so I make mistakes: please double-check anything important.",
        "My name is nanochat-mole. I'm a small chat model, made with nanochat-mole, a hackable LLM training stack."
        + machine,
        "I'm nanochat-mole, a compact ChatGPT-style assistant made with the open nanochat-mole stack." + method,
    )
    not_chatgpt = (
        "No. I'm nanochat-mole, a much smaller model made with the open nanochat-mole stack, not a product of OpenAI.",
        "No, I'm not. I'm nanochat-mole: a small language model trained with nanochat-mole." + machine,
    )
    training = (
        "nanochat-mole trained me to hold conversations like this one." + history + method + machine,
        "I was trained with nanochat-mole, a small open stack that trains a chat model end to end." + history + machine,
    )
    table = [(WHO_QUESTIONS, who), (NOT_CHATGPT_QUESTIONS, not_chatgpt), (TRAINING_QUESTIONS, training)]
    if run.molegrad:  # a model trained without MoleGrad is not taught about it
        table.append((MOLEGRAD_QUESTIONS, (f"MoleGrad is {MOLEGRAD_TEXT}. My training used it." + machine,
                                           f"My training used MoleGrad, {MOLEGRAD_TEXT}.")))
    return table


class Identity(SyntheticTask):
    """Training-only: conversations teaching the model its name and origin (as far as `run` shows)."""

    eval_type = "generative"

    def __init__(self, size: int = 200, split: str = "train", seed: int = 42,
                 start: int = 0, stop: int | None = None, step: int = 1, run: TrainingRun = TrainingRun()) -> None:
        super().__init__(size, split, seed, start, stop, step)
        self.topics = identity_topics(run)

    def get_example(self, index: int) -> Conversation:
        rng = self.rng(index)
        messages = []
        if rng.random() < 0.3:
            greeting, reply = rng.choice(GREETINGS)
            messages += [{"role": "user", "content": greeting}, {"role": "assistant", "content": reply}]
        questions, answers = rng.choice(self.topics)
        messages += [{"role": "user", "content": rng.choice(questions)}, {"role": "assistant", "content": rng.choice(answers)}]
        return {"messages": messages}
