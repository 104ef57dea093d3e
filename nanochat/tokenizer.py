"""BPE tokenizer: trained with rustbpe, run with tiktoken; special tokens; conversation rendering;
the text of a streamed reply (StreamDecoder, assistant_parts, chat_prompt).

Ids: 0..255 are the raw bytes, then the learned merges in the order they were learned (rank =
id), then the nine special tokens. `vocab_size` everywhere means the TOTAL (merges + bytes +
specials), so `--vocab_size=65536` gives an embedding table of exactly 65536 rows.

Files in a tokenizer directory (default $NANOCHAT_BASE_DIR/tokenizer):

    tokenizer.json    split pattern, ranks (= ids), special tokens: Hugging Face tokenizers'
                      format, so transformers reads it as is (`Tokenizer.to_hf_json`)
    token_bytes.pt    int32 (vocab_size,): UTF-8 bytes per token, 0 for specials (bits per byte)
    meta.json         how it was trained (written by scripts.tok_train, last)

Plain text is always encoded as ordinary text: a document containing the characters
"<|bos|>" gets byte-level tokens for them, never the special id. Special ids enter only
through `prepend`/`append`, `encode_special` and the conversation renderer.
"""

from __future__ import annotations

import codecs
import copy
import itertools
import json
import re
import warnings
from pathlib import Path
from typing import Any, Iterable

import rustbpe
import tiktoken
import torch

from nanochat.common import atomic_write, get_base_dir

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document; the dataloader's document separator
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the Python tool...
    "<|python_end|>",
    "<|output_start|>",  # ...and the tool's output comes back (never trained on)
    "<|output_end|>",
]

# GPT-4's split pattern with one change: numbers split into runs of at most 2 digits, not 3.
# Every 1..3-digit string as its own token costs up to 1110 vocabulary slots (GPT-4 has 100k to
# spare); with runs of 1..2 it is at most 110, which matters at our 65k and more so at the few
# thousand tokens of the CPU pipeline. The price is ~1.5x more tokens on digit-heavy text.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

TOKENIZER_FILE = "tokenizer.json"
LEGACY_TOKENIZER_FILE = "tokenizer.pkl"  # the format before tokenizer.json: never loaded (a pickle can run code)
TOKEN_BYTES_FILE = "token_bytes.pt"
META_FILE = "meta.json"


def _byte_chars() -> list[str]:
    """Byte b -> the printable character that stands for it in byte-level BPE vocabularies (GPT-2's
    table): printable Latin-1 bytes stand for themselves, the other 68 for chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


BYTE_CHARS = _byte_chars()
CHAR_BYTES = {char: b for b, char in enumerate(BYTE_CHARS)}

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "python", "python_output")


def default_tokenizer_dir() -> Path:
    return get_base_dir() / "tokenizer"


class Tokenizer:
    """A tiktoken encoding built from mergeable ranks, plus the nine special tokens after them."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN) -> None:
        n_ranks = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n_ranks)):
            raise ValueError(f"mergeable ranks must be the ids 0..{n_ranks - 1}, each once (no gaps, no duplicates)")
        missing = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
        if missing:
            raise ValueError(f"mergeable ranks lack {len(missing)} of the 256 single-byte tokens (first: {missing[0]})")
        self.pattern = pattern
        self.mergeable_ranks = mergeable_ranks
        self.special_ids = {name: n_ranks + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(
            name="nanochat", pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=self.special_ids
        )
        self.bos_token_id = self.special_ids["<|bos|>"]

    # -------------------------------------------------------------------------------------
    # training, saving, loading

    @classmethod
    def train_from_iterator(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Learn vocab_size - 9 byte-level BPE tokens (256 bytes + merges) from `texts` with rustbpe.

        Ties between equally frequent pairs go to the smallest (left id, right id): rustbpe's rule,
        tested against a pure-Python trainer. A corpus too small for all the merges gives a
        smaller vocabulary; `get_vocab_size()` tells.
        """
        min_size = 256 + len(SPECIAL_TOKENS)
        if vocab_size < min_size:
            raise ValueError(f"vocab_size must be >= {min_size} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        pieces = trainer.get_mergeable_ranks()  # [(token bytes as list[int], id)]
        ranks = {bytes(token): rank for token, rank in pieces}
        if len(ranks) != len(pieces):
            raise ValueError(f"rustbpe produced {len(pieces) - len(ranks)} duplicate tokens; cannot build a tiktoken encoding")
        return cls(ranks, trainer.get_pattern())

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and token_bytes.pt into `directory`, each atomically."""
        directory = Path(directory)
        text = json.dumps(self.to_hf_json(), ensure_ascii=False).encode("utf-8")
        atomic_write(directory / TOKENIZER_FILE, lambda f: f.write(text))
        atomic_write(directory / TOKEN_BYTES_FILE, lambda f: torch.save(self.token_bytes(), f))

    def to_hf_json(self) -> dict[str, Any]:
        """This tokenizer as a Hugging Face `tokenizer.json` that encodes as tiktoken does (the same
        ids on 1 MB of the local corpus: tests/test_hf.py).

        Byte-level BPE whose vocabulary ids are our ids. tiktoken merges, within each pre-token,
        the adjacent pair whose concatenation has the lowest rank; the merge list says the same:
        every split of every token into two vocabulary tokens, ordered by the rank of the token it
        makes. `ignore_merges`: a pre-token that is itself a token is that token (tiktoken's
        shortcut). The specials follow as added tokens.
        """

        def chars(token: bytes) -> str:
            return "".join(BYTE_CHARS[b] for b in token)

        splits = []  # (rank made, left rank, right rank, left, right)
        for token, rank in self.mergeable_ranks.items():
            for i in range(1, len(token)):
                left, right = self.mergeable_ranks.get(token[:i]), self.mergeable_ranks.get(token[i:])
                if left is not None and right is not None:
                    splits.append((rank, left, right, token[:i], token[i:]))
        splits.sort(key=lambda split: split[:3])
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [{"id": token_id, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for name, token_id in self.special_ids.items()],
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            "model": {
                "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                "vocab": {chars(token): rank for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])},
                "merges": [[chars(left), chars(right)] for *_, left, right in splits],
            },
        }

    @classmethod
    def from_hf_json(cls, data: Any, source: str) -> Tokenizer:
        """The tokenizer a parsed `tokenizer.json` describes: ours (`to_hf_json`) or any Hugging Face
        byte-level BPE of that shape (Split regex + ByteLevel pre-tokenizer, vocabulary ids = ranks,
        our nine special tokens right after the ranks). Raises ValueError naming `source` and the part."""
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict) or data["model"].get("type") != "BPE":
            raise ValueError(f"tokenizer file {source}: expected a Hugging Face tokenizer.json with a BPE model")
        pre = data.get("pre_tokenizer") or {}
        steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
        kinds = [step.get("type") for step in steps if isinstance(step, dict)]
        if kinds != ["Split", "ByteLevel"] or not isinstance(steps[0].get("pattern"), dict) or "Regex" not in steps[0]["pattern"]:
            raise ValueError(f"tokenizer file {source}: pre_tokenizer {kinds} is not supported; expected a Split regex "
                             f"then ByteLevel (a byte-level BPE like nanochat's)")
        added = data.get("added_tokens") or []
        if not isinstance(added, list) or not all(isinstance(token, dict) for token in added):
            raise ValueError(f"tokenizer file {source}: added_tokens is not a list of {{id, content}} objects")
        specials = {token.get("content"): token.get("id") for token in added}
        ranks: dict[bytes, int] = {}
        vocab = data["model"].get("vocab")
        if not isinstance(vocab, dict):
            raise ValueError(f"tokenizer file {source}: model.vocab is not a token -> id mapping")
        for piece, token_id in vocab.items():
            if piece in specials:
                continue
            try:
                ranks[bytes(CHAR_BYTES[char] for char in piece)] = token_id
            except KeyError:
                raise ValueError(f"tokenizer file {source}: vocabulary entry {piece!r} (id {token_id}) is not "
                                 f"byte-level (a character outside the 256-byte table)") from None
        try:
            tokenizer = cls(ranks, steps[0]["pattern"]["Regex"])
        except ValueError as e:
            raise ValueError(f"tokenizer file {source}: {e}") from e
        if specials != tokenizer.special_ids:
            raise ValueError(f"tokenizer file {source}: special tokens {specials} differ from nanochat's "
                             f"{tokenizer.special_ids} (the nine names, in order, right after the {len(ranks)} ranks)")
        return tokenizer

    @classmethod
    def from_directory(cls, directory: str | Path) -> Tokenizer:
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            legacy = path.with_name(LEGACY_TOKENIZER_FILE)
            if legacy.is_file():
                raise ValueError(f"{legacy} is the old pickle format, which is no longer loaded (a pickle can run code): "
                                 f"convert it once with `python -m scripts.tok_train --convert_legacy`, or retrain "
                                 f"with `python -m scripts.tok_train --force`")
            raise FileNotFoundError(f"no tokenizer file at {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"cannot read tokenizer file {path}: {type(e).__name__}: {e} (retrain: python -m scripts.tok_train --force)") from e
        return cls.from_hf_json(data, str(path))

    # -------------------------------------------------------------------------------------
    # vocabulary

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def get_special_tokens(self) -> list[str]:
        return list(SPECIAL_TOKENS)

    def encode_special(self, name: str) -> int:
        try:
            return self.special_ids[name]
        except KeyError:
            raise ValueError(f"unknown special token {name!r}; expected one of {' '.join(SPECIAL_TOKENS)}") from None

    def token_bytes(self) -> torch.Tensor:
        """int32 (vocab_size,): bytes of text each id stands for; 0 for specials (no text)."""
        counts = [len(self.enc.decode_single_token_bytes(i)) for i in range(len(self.mergeable_ranks))]
        return torch.tensor(counts + [0] * len(SPECIAL_TOKENS), dtype=torch.int32)

    # -------------------------------------------------------------------------------------
    # text

    def _as_id(self, token: int | str) -> int:
        if isinstance(token, str):
            return self.encode_special(token)
        if not 0 <= token < self.get_vocab_size():
            raise ValueError(f"token id {token} out of range 0..{self.get_vocab_size() - 1}")
        return token

    def encode(
        self, text: str | list[str], prepend: int | str | None = None, append: int | str | None = None, num_threads: int = 8
    ) -> list[int] | list[list[int]]:
        """Ids of `text` (ordinary text only), or one list per string for a list (in parallel).

        `prepend`/`append`: a token id or special-token name added to each encoded string.
        """
        head = [] if prepend is None else [self._as_id(prepend)]
        tail = [] if append is None else [self._as_id(append)]
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text) + tail
        if isinstance(text, list):
            return [head + ids + tail for ids in self.enc.encode_ordinary_batch(text, num_threads=num_threads)]
        raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    # -------------------------------------------------------------------------------------
    # conversations

    def render_conversation(self, conversation: dict[str, Any], max_tokens: int | None = 2048) -> tuple[list[int], list[int]]:
        """(ids, mask) of a whole conversation; mask 1 on the tokens the assistant must learn.

        <|bos|> <|user_start|> text <|user_end|> <|assistant_start|> reply <|assistant_end|> ...
        Trained (mask 1): the assistant's text, its <|python_start|>call<|python_end|> tool
        calls, and <|assistant_end|> (so it learns to stop). Not trained (mask 0): everything
        else, including <|output_start|>tool output<|output_end|>, which the tool writes.
        A leading system message is prepended to the first user message. Truncated to
        max_tokens (None: never).
        """
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: list[int], trained: int) -> None:
            ids.extend(tokens)
            mask.extend([trained] * len(tokens))

        add([self.bos_token_id], 0)
        for role, content in self._validated_turns(conversation):
            if role == "user":
                add([self.special_ids["<|user_start|>"]], 0)
                add(self.encode(content), 0)
                add([self.special_ids["<|user_end|>"]], 0)
                continue
            add([self.special_ids["<|assistant_start|>"]], 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                tokens = self.encode(part["text"])
                if part["type"] == "text":
                    add(tokens, 1)
                elif part["type"] == "python":
                    add([self.special_ids["<|python_start|>"]] + tokens + [self.special_ids["<|python_end|>"]], 1)
                else:
                    add([self.special_ids["<|output_start|>"]] + tokens + [self.special_ids["<|output_end|>"]], 0)
            add([self.special_ids["<|assistant_end|>"]], 1)
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, conversation: dict[str, Any]) -> list[int]:
        """Prompt ids for sampling the assistant's next reply: the conversation without its final
        assistant message (the reference answer), if it ends with one, then <|assistant_start|>."""
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            conversation = copy.copy(conversation)
            conversation["messages"] = messages[:-1]
        ids, _ = self.render_conversation(conversation, max_tokens=None)
        return ids + [self.special_ids["<|assistant_start|>"]]

    def _validated_turns(self, conversation: dict[str, Any]) -> list[tuple[str, Any]]:
        """(role, content) per turn, system merged into the first user turn; raises ValueError
        naming the message index and what was expected."""
        if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
            raise ValueError("conversation must be a dict with a 'messages' list")
        messages = conversation["messages"]
        if not messages:
            raise ValueError("conversation has no messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise ValueError(f"message {i}: expected a dict with role one of {'|'.join(ROLES)}, got {message!r:.80}")
        system = None
        if messages[0]["role"] == "system":
            system = messages[0]["content"]
            if not isinstance(system, str):
                raise ValueError(f"message 0: system content must be a str, got {type(system).__name__}")
        start = 0 if system is None else 1
        if system is not None and len(messages) == 1:
            raise ValueError("message 0: a system message must be followed by a user message")
        turns = []
        for i in range(start, len(messages)):
            role, content = messages[i]["role"], messages[i].get("content")
            expected = "user" if (i - start) % 2 == 0 else "assistant"
            if role != expected:
                raise ValueError(f"message {i}: expected role '{expected}' (after an optional system message, roles alternate user/assistant starting with user), got '{role}'")
            if role == "user":
                if not isinstance(content, str):
                    raise ValueError(f"message {i}: user content must be a str, got {type(content).__name__}")
                if i == start and system is not None:
                    content = system + "\n\n" + content
            else:
                self._check_assistant_content(i, content)
            turns.append((role, content))
        return turns

    @staticmethod
    def _check_assistant_content(index: int, content: Any) -> None:
        if isinstance(content, str):
            return
        if not isinstance(content, list):
            raise ValueError(f"message {index}: assistant content must be a str or a list of parts, got {type(content).__name__}")
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in PART_TYPES or not isinstance(part.get("text"), str):
                raise ValueError(
                    f"message {index} part {j}: expected {{'type': {'|'.join(PART_TYPES)}, 'text': str}}, got {part!r:.80}"
                )

    def visualize_mask(self, ids: list[int], mask: list[int]) -> str:
        """The rendered tokens as text with trained spans (mask 1) in [[...]], for eyeballing."""
        spans = []
        for trained, group in itertools.groupby(zip(ids, mask), key=lambda pair: pair[1]):
            text = self.decode([token_id for token_id, _ in group])
            spans.append(f"[[{text}]]" if trained else text)
        return "".join(spans)


def get_tokenizer(directory: str | Path | None = None) -> Tokenizer:
    """The trained tokenizer (default $NANOCHAT_BASE_DIR/tokenizer)."""
    directory = Path(directory) if directory is not None else default_tokenizer_dir()
    if not (directory / TOKENIZER_FILE).is_file() and not (directory / LEGACY_TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"no tokenizer at {directory / TOKENIZER_FILE}: train one first with `python -m scripts.tok_train`")
    return Tokenizer.from_directory(directory)


def get_token_bytes(device: str | torch.device = "cpu", directory: str | Path | None = None) -> torch.Tensor:
    """int32 (vocab_size,): UTF-8 bytes per token id, 0 for specials; for bits per byte."""
    directory = Path(directory) if directory is not None else default_tokenizer_dir()
    path = directory / TOKEN_BYTES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no token bytes at {path}: train the tokenizer first with `python -m scripts.tok_train`")
    retrain = "retrain: python -m scripts.tok_train --force"
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the weights-only unpickler's notes on pickle protocols
            token_bytes = torch.load(f, map_location=device, weights_only=True)
    except Exception as e:  # torch's own message spans lines, with terminal escapes: its type says enough
        raise ValueError(f"cannot read token bytes file {path}: not a tensor file ({type(e).__name__}); {retrain}") from None
    if not (isinstance(token_bytes, torch.Tensor) and token_bytes.ndim == 1 and not token_bytes.is_floating_point()):
        raise ValueError(f"token bytes file {path}: expected a 1-D integer tensor, got {type(token_bytes).__name__}; {retrain}")
    return token_bytes


# ---------------------------------------------------------------------------------------------
# text of a reply: streaming decode, tool-call markers, the chat prompt

class StreamDecoder:
    """Text of a token stream, piece by piece, emitting only complete UTF-8 characters.

    A byte-level BPE token can end in the middle of a multi-byte character (an emoji is 4 bytes,
    a CJK character 3); its bytes wait in an incremental UTF-8 decoder until the character is
    complete. Special tokens come out as their names ("<|python_start|>"), which is how tool
    calls appear in a reply's text (`assistant_parts` reads them back). Invalid bytes become
    U+FFFD, never an exception.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.special_names = {tokenizer.encode_special(name): name for name in tokenizer.get_special_tokens()}
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        """The text completed by `token` (possibly "")."""
        name = self.special_names.get(token)
        if name is not None:
            return self.flush() + name
        return self._utf8.decode(self.tokenizer.enc.decode_single_token_bytes(token))

    def flush(self) -> str:
        """Whatever is still buffered (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


_MARKER_PART = {"<|python_start|>": "python", "<|output_start|>": "python_output",
                "<|python_end|>": "text", "<|output_end|>": "text"}
_MARKERS = re.compile("(" + "|".join(re.escape(marker) for marker in _MARKER_PART) + ")")


def assistant_parts(text: str) -> str | list[dict[str, str]]:
    """An assistant reply's text (tool calls written as their special tokens, as StreamDecoder
    gives them) as conversation content: the text itself when it has no tool call, else parts
    [{"type": "text"|"python"|"python_output", "text": ...}] for Tokenizer.render_conversation.
    An unclosed call (an interrupted reply) keeps its type up to the end."""
    pieces = _MARKERS.split(text)
    if len(pieces) == 1:
        return text
    parts, kind = [], "text"
    for i, piece in enumerate(pieces):
        if i % 2 == 1:  # a marker: the part type of what follows
            kind = _MARKER_PART[piece]
        elif piece or kind != "text":  # keep empty calls/outputs, drop empty text between markers
            parts.append({"type": kind, "text": piece})
    return parts


def chat_prompt(tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> list[int]:
    """Prompt ids for the assistant's next reply after `messages` ({"role", "content": str});
    assistant messages may carry tool calls as marker text (see `assistant_parts`)."""
    converted = [{"role": m["role"], "content": assistant_parts(m["content"]) if m["role"] == "assistant" else m["content"]}
                 for m in messages]
    return tokenizer.render_for_completion({"messages": converted})
