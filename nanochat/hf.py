"""Hugging Face format: our GPT + tokenizer to a folder that transformers' NanoChat loads, and back.

    export_hf(model, tokenizer, out_dir)      # writes the files below
    model, tokenizer = load_hf(folder)        # our GPT (float32, eval mode) and Tokenizer

A folder holds config.json (transformers' NanoChatConfig), model.safetensors (the weights only: no
MoleGrad subspaces, no optimizer state), generation_config.json, tokenizer.json (our own format,
nanochat.tokenizer) and tokenizer_config.json (special tokens and a chat template that renders a
conversation as `Tokenizer.render_conversation` / `render_for_completion` do).

The architectures match one to one; names map as (nanochat.hf.hf_names, recipe pieces included)

    transformer.wte.weight              <-> model.embed_tokens.weight
    transformer.h.{i}.attn.c_q/c_k/c_v  <-> model.layers.{i}.self_attn.q_proj/k_proj/v_proj
    transformer.h.{i}.attn.c_proj       <-> model.layers.{i}.self_attn.o_proj
    transformer.h.{i}.mlp.c_fc/c_proj   <-> model.layers.{i}.mlp.fc1/fc2
    lm_head.weight                      <-> lm_head.weight

with no permutation: both rotate the channel pairs (x[i], x[i + head_dim/2]) (transformers'
`rotate_half`), both norm q and k after rotary, both group query heads onto kv heads in order.
Our RMSNorm's eps is float32's machine epsilon; a hub config's `rms_norm_eps` up to 1e-5 is
accepted (at unit RMS the difference is below 1e-5 relative). Anything else our GPT lacks (biases,
another activation or rotary variant, no softcap...) is refused with one line naming it.
A model trained with recipe pieces (GPTConfig.recipe_pieces: layer lambdas, smear gate, backout,
value embeddings) is exported as model_type "nanochat_mole": transformers' NanoChat plus the pieces,
in modeling_nanochat_mole.py (a copy of nanochat/hf_recipe.py) that config.json's auto_map names, so
it loads with trust_remote_code=True, and so does its tokenizer: AutoTokenizer reads config.json
first, and without that flag transformers asks on stdin before running the code it names (nothing
in the folder can avoid that short of claiming transformers' own model type, which would load the
model without its pieces); the pieces' weights keep our names under model. (and
model.layers.{i}.self_attn.ve_gate). A model without pieces stays plain "nanochat", no code.
Needs the `hf` extra (safetensors); transformers itself only to run the exported folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from nanochat.common import atomic_write
from nanochat.config import UserError
from nanochat.gpt import BLOCK_LINEARS, GPT, RECIPE_PIECES, SMEAR_GATE_CHANNELS, VE_GATE_CHANNELS, GPTConfig, has_value_embed
from nanochat.ops import ROTARY_BASE
from nanochat.tokenizer import LEGACY_TOKENIZER_FILE, TOKENIZER_FILE, Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"  # sharded hub checkpoints
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
ARCHITECTURE = "NanoChatForCausalLM"
RECIPE_MODEL_TYPE = "nanochat_mole"  # NanoChat + recipe pieces, in remote code
RECIPE_ARCHITECTURE = "NanoChatMoleForCausalLM"
RECIPE_CODE_FILE = "modeling_nanochat_mole.py"  # a copy of nanochat/hf_recipe.py
RECIPE_CODE_SOURCE = Path(__file__).with_name("hf_recipe.py")
MAX_RMS_NORM_EPS = 1e-5
OUR_RMS_NORM_EPS = torch.finfo(torch.float32).eps  # our RMSNorm's eps at float32
HF_LINEAR_NAMES = {
    "attn.c_q": "self_attn.q_proj",
    "attn.c_k": "self_attn.k_proj",
    "attn.c_v": "self_attn.v_proj",
    "attn.c_proj": "self_attn.o_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
assert set(HF_LINEAR_NAMES) == set(BLOCK_LINEARS)

# The chat template: renders exactly the ids of Tokenizer.render_conversation (add_generation_prompt
# false) or render_for_completion (a conversation ending with a user message, add_generation_prompt
# true). Assistant content is a string or a list of parts {"type": "text"|"python"|"python_output",
# "text": ...}, as in our conversations. Every piece of text sits between two special tokens, so
# tokenizing the rendered string gives the ids of encoding each piece on its own, as we do
# (except two text parts in a row, which we encode separately and a string cannot keep apart).
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}"
    "{{- '<|bos|>' -}}"
    "{%- for message in turns -%}"
    "{%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}"
    "{{- raise_exception('roles must alternate user/assistant (after an optional system message), starting with user') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<|user_start|>' -}}"
    "{%- if loop.first and system is not none -%}{{- system + '\n\n' -}}{%- endif -%}"
    "{{- message['content'] + '<|user_end|>' -}}"
    "{%- else -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'python' -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}"
    "{%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
    "{%- else -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)


class HFFormatError(UserError, ValueError):
    """A folder that is not an HF NanoChat model our GPT can hold; the message names the file and what."""


# ---------------------------------------------------------------------------------------------
# export

def gate_channels(width: int) -> dict[str, int]:
    """The input channels of the smear gate and the value gates at this model width (config.json's names)."""
    return {"smear_gate_channels": min(SMEAR_GATE_CHANNELS, width), "ve_gate_channels": min(VE_GATE_CHANNELS, width)}


def hf_config(config: GPTConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """config.json: transformers' NanoChatConfig for `config` (architecture fields only); with recipe
    pieces, the NanoChatMoleConfig of modeling_nanochat_mole.py (the same fields, the pieces, auto_map)."""
    pieces = config.recipe_pieces()
    recipe = {
        "architectures": [RECIPE_ARCHITECTURE],
        "model_type": RECIPE_MODEL_TYPE,
        "auto_map": {"AutoConfig": f"{RECIPE_CODE_FILE[:-3]}.NanoChatMoleConfig",
                     "AutoModelForCausalLM": f"{RECIPE_CODE_FILE[:-3]}.{RECIPE_ARCHITECTURE}"},
        **{name: getattr(config, name) for name in RECIPE_PIECES},
        **gate_channels(config.n_embd),
    } if pieces else {"architectures": [ARCHITECTURE], "model_type": "nanochat"}
    return {
        **recipe,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": 4 * config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.sequence_len,
        "hidden_act": "relu2",
        "rms_norm_eps": OUR_RMS_NORM_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROTARY_BASE},
        "final_logit_softcapping": config.softcap,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.get_bos_token_id(),
        "eos_token_id": tokenizer.encode_special("<|assistant_end|>"),
        "pad_token_id": None,  # a pad id would freeze that embedding row in transformers' training
        "dtype": "float32",
        "use_cache": True,
    }


def hf_names(config: GPTConfig) -> dict[str, str]:
    """transformers' tensor name -> ours, for every weight of a GPT with `config` (pieces included)."""
    names = {"model.embed_tokens.weight": "transformer.wte.weight", "lm_head.weight": "lm_head.weight"}
    for i in range(config.n_layer):
        for ours, theirs in HF_LINEAR_NAMES.items():
            names[f"model.layers.{i}.{theirs}.weight"] = f"transformer.h.{i}.{ours}.weight"
        if has_value_embed(config, i):
            names[f"model.value_embeds.{i}.weight"] = f"value_embeds.{i}.weight"
            names[f"model.layers.{i}.self_attn.ve_gate.weight"] = f"transformer.h.{i}.attn.ve_gate.weight"
    pieces = {"layer_lambdas": ["resid_lambdas", "x0_lambdas"], "smear_gate": ["smear_gate.weight", "smear_lambda"],
              "backout": ["backout_lambda"]}
    for piece, ours in pieces.items():
        if getattr(config, piece):
            names.update({f"model.{name}": name for name in ours})
    return names


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The weights under transformers' names, float32, contiguous; MoleGrad buffers left out."""
    own = model.state_dict()
    state = {theirs: own[ours] for theirs, ours in hf_names(model.config).items()}
    return {key: tensor.detach().to("cpu", torch.float32).contiguous() for key, tensor in state.items()}


def tokenizer_config(tokenizer: Tokenizer, model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json: transformers' fast tokenizer over tokenizer.json, with our chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|assistant_end|>",
        "pad_token": "<|bos|>",
        "additional_special_tokens": tokenizer.get_special_tokens()[1:],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }


def generation_config(tokenizer: Tokenizer) -> dict[str, Any]:
    """generation_config.json: stop where our Engine stops (<|assistant_end|> or <|bos|>)."""
    bos = tokenizer.get_bos_token_id()
    return {"bos_token_id": bos, "eos_token_id": [tokenizer.encode_special("<|assistant_end|>"), bos], "pad_token_id": bos}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    text = (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    atomic_write(path, lambda f: f.write(text))


def export_tokenizer(tokenizer: Tokenizer, out_dir: str | Path, model_max_length: int) -> None:
    """tokenizer.json and tokenizer_config.json (with the chat template) into `out_dir`."""
    out = Path(out_dir)
    text = json.dumps(tokenizer.to_hf_json(), ensure_ascii=False).encode("utf-8")
    atomic_write(out / TOKENIZER_FILE, lambda f: f.write(text))
    _write_json(out / TOKENIZER_CONFIG_FILE, tokenizer_config(tokenizer, model_max_length))


def export_hf(model: GPT, tokenizer: Tokenizer, out_dir: str | Path) -> Path:
    """Write `model` and `tokenizer` as an HF NanoChat folder (config last). Returns the folder."""
    from safetensors.torch import save

    if model.config.vocab_size != tokenizer.get_vocab_size():
        raise HFFormatError(f"model vocab_size {model.config.vocab_size} differs from the tokenizer's "
                            f"{tokenizer.get_vocab_size()}: export the tokenizer this model was trained with")
    out = Path(out_dir)
    weights = save(hf_state_dict(model), metadata={"format": "pt"})
    atomic_write(out / WEIGHTS_FILE, lambda f: f.write(weights))
    export_tokenizer(tokenizer, out, model.config.sequence_len)
    _write_json(out / GENERATION_CONFIG_FILE, generation_config(tokenizer))
    if model.config.recipe_pieces():
        code = RECIPE_CODE_SOURCE.read_bytes()
        atomic_write(out / RECIPE_CODE_FILE, lambda f: f.write(code))
    else:
        (out / RECIPE_CODE_FILE).unlink(missing_ok=True)  # from an earlier export into the same folder
    _write_json(out / CONFIG_FILE, hf_config(model.config, tokenizer))
    return out


# ---------------------------------------------------------------------------------------------
# import

def gpt_config_from_hf(hf: dict[str, Any], source: str, **options: Any) -> GPTConfig:
    """Our GPTConfig for an HF NanoChat config; `options` are GPTConfig fields a run sets itself
    (recompute, molegrad_*, sequence_len). Raises HFFormatError naming every feature our GPT lacks."""
    if hf.get("model_type") not in ("nanochat", RECIPE_MODEL_TYPE):
        raise HFFormatError(f"{source}: model_type {hf.get('model_type')!r}, expected 'nanochat' "
                            f"(transformers' {ARCHITECTURE}) or {RECIPE_MODEL_TYPE!r} (ours, with recipe pieces); "
                            f"other architectures cannot be imported")
    pieces = {}
    if hf["model_type"] == RECIPE_MODEL_TYPE:
        for name in RECIPE_PIECES:
            if not isinstance(hf.get(name, False), bool):
                raise HFFormatError(f"{source}: {name} is {hf[name]!r}, expected true or false")
            pieces[name] = hf.get(name, False)
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(hf.get(key), int) or hf[key] < 1:
            raise HFFormatError(f"{source}: {key} is missing or not a positive integer")
    width, n_head = hf["hidden_size"], hf["num_attention_heads"]
    n_kv_head = hf.get("num_key_value_heads") or n_head
    rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta", ROTARY_BASE)}
    softcap = hf.get("final_logit_softcapping", 15.0)
    eps = hf.get("rms_norm_eps", 1e-6)
    lacks = []
    if hf.get("hidden_act", "relu2") != "relu2":
        lacks.append(f"hidden_act={hf['hidden_act']!r} (ours: relu2)")
    if hf.get("intermediate_size", 4 * width) != 4 * width:
        lacks.append(f"intermediate_size={hf['intermediate_size']} (ours: 4 x hidden_size = {4 * width})")
    if width % n_head or (hf.get("head_dim") or width // n_head) != width // n_head:
        lacks.append(f"head_dim={hf.get('head_dim')} with hidden_size={width}, {n_head} heads (ours: hidden_size / heads)")
    if hf.get("attention_bias"):
        lacks.append("attention_bias=true (ours: no biases)")
    if hf.get("attention_dropout"):
        lacks.append(f"attention_dropout={hf['attention_dropout']} (ours: none)")
    if (rope.get("rope_type", "default") != "default" or rope.get("rope_theta") != ROTARY_BASE
            or set(rope) - {"rope_type", "rope_theta"} or hf.get("rope_scaling")):
        lacks.append(f"rope {rope} (ours: default rotary, theta {ROTARY_BASE:g})")
    if not isinstance(softcap, (int, float)) or softcap <= 0:
        lacks.append(f"final_logit_softcapping={softcap} (ours: a positive logit softcap)")
    for key, ours in gate_channels(width).items():
        if pieces and hf.get(key, ours) != ours:
            lacks.append(f"{key}={hf[key]} (ours: {ours} at hidden_size {width})")
    if not isinstance(eps, (int, float)) or not 0 <= eps <= MAX_RMS_NORM_EPS:
        lacks.append(f"rms_norm_eps={eps} (ours: float32 epsilon; up to {MAX_RMS_NORM_EPS:g} accepted)")
    if lacks:
        raise HFFormatError(f"{source}: our GPT lacks {'; '.join(lacks)}")
    architecture = dict(sequence_len=hf.get("max_position_embeddings", 2048), vocab_size=hf["vocab_size"],
                        n_layer=hf["num_hidden_layers"], n_head=n_head, n_kv_head=n_kv_head, n_embd=width,
                        softcap=float(softcap), **pieces)
    try:
        return GPTConfig(**{**architecture, **options})
    except ValueError as e:
        raise HFFormatError(f"{source}: {e}") from e


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise HFFormatError(f"missing {path.name} in {path.parent} (an HF NanoChat folder has {CONFIG_FILE}, "
                            f"{WEIGHTS_FILE} and {TOKENIZER_FILE})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise HFFormatError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    if not isinstance(data, dict):
        raise HFFormatError(f"{path}: expected a JSON object")
    return data


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors, or of the shards a model.safetensors.index.json lists."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if (folder / WEIGHTS_FILE).is_file():
        files = [folder / WEIGHTS_FILE]
    elif (folder / WEIGHTS_INDEX_FILE).is_file():
        weight_map = _read_json(folder / WEIGHTS_INDEX_FILE).get("weight_map", {})
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        pickled = [name for name in ("pytorch_model.bin", "model.pt") if (folder / name).exists()]
        hint = f" ({pickled[0]} is a pickle and is not read: convert it to safetensors)" if pickled else ""
        raise HFFormatError(f"missing {WEIGHTS_FILE} in {folder}{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        if not path.is_file():
            raise HFFormatError(f"missing weights file {path} (listed in {WEIGHTS_INDEX_FILE})")
        try:
            tensors.update(load_file(path))
        except (SafetensorError, OSError) as e:
            raise HFFormatError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    return tensors


def gpt_state_from_hf(tensors: dict[str, torch.Tensor], model: GPT, tied: bool, source: str) -> dict[str, torch.Tensor]:
    """`model`'s weights (float32, our names) from transformers-named tensors; raises naming missing,
    unexpected or misshapen tensors. `tied`: lm_head shares the embedding (may be absent)."""
    names = hf_names(model.config)
    if tied and "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
        tensors = {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}
    missing = sorted(set(names) - set(tensors))
    unexpected = sorted(set(tensors) - set(names))
    if missing or unexpected:
        raise HFFormatError(f"{source}: tensors do not match the config's architecture: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]} (features our GPT lacks, or another model)")
    own = model.state_dict()
    for theirs, ours in names.items():
        if tensors[theirs].shape != own[ours].shape:
            raise HFFormatError(f"{source}: {theirs} has shape {tuple(tensors[theirs].shape)}, "
                                f"config.json implies {tuple(own[ours].shape)}")
    return {ours: tensors[theirs].to(torch.float32) for theirs, ours in names.items()}


def load_hf(folder: str | Path, **options: Any) -> tuple[GPT, Tokenizer]:
    """Our GPT (float32, CPU, eval mode) and Tokenizer from an HF NanoChat folder; `options` are
    GPTConfig fields a run sets itself (recompute, molegrad_*, sequence_len). Bad input raises
    HFFormatError naming the file and what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HFFormatError(f"--init_from_hf={folder}: not a directory")
    hf = _read_json(folder / CONFIG_FILE)
    config = gpt_config_from_hf(hf, str(folder / CONFIG_FILE), **options)
    if not (folder / TOKENIZER_FILE).is_file():
        legacy = " (tokenizer.pkl is a pickle and is not read)" if (folder / LEGACY_TOKENIZER_FILE).exists() else ""
        raise HFFormatError(f"missing {TOKENIZER_FILE} in {folder}{legacy}")
    try:
        tokenizer = Tokenizer.from_directory(folder)
    except ValueError as e:
        raise HFFormatError(str(e)) from e
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise HFFormatError(f"{folder}: config.json vocab_size {config.vocab_size} differs from {TOKENIZER_FILE}'s "
                            f"{tokenizer.get_vocab_size()} tokens (ours needs them equal)")
    model = GPT(config)  # MoleGrad subspaces start at their seeded start; the weights come next
    state = gpt_state_from_hf(read_hf_weights(folder), model, bool(hf.get("tie_word_embeddings")), str(folder))
    model.load_state_dict({**model.state_dict(), **state}, strict=True)
    model.eval()
    return model, tokenizer
