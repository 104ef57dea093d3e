"""Hugging Face export/import (nanochat/hf.py) against transformers' own NanoChat: logits, greedy
generation, tokenizer ids on 1 MB of the local corpus, the chat template, round trips, bad folders."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import needs_extra

pytestmark = pytest.mark.hf
needs_extra("safetensors", "hf")
transformers = needs_extra("transformers", "hf")

from safetensors.torch import load_file, save_file  # noqa: E402

from nanochat.gpt import GPT, RECIPE_PIECES, GPTConfig  # noqa: E402
from nanochat.hf import (  # noqa: E402
    CONFIG_FILE,
    RECIPE_CODE_FILE,
    WEIGHTS_FILE,
    HFFormatError,
    export_hf,
    export_tokenizer,
    load_hf,
)
from nanochat.optim import setup_optimizers  # noqa: E402
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer  # noqa: E402
from tests.helpers import RECIPE_PIECE_SETS, TINY_BASE_TRAIN_ARGS, WORDS, tiny_corpus_texts  # noqa: E402

HF_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator(tiny_corpus_texts(100, seed=1) + ["print(12 + 345)\n🦊 naïve café"], 320)


def tiny_gpt(tok: Tokenizer, seed: int = 0, n_layer: int = 2, sequence_len: int = 32, **options) -> GPT:
    """Depth 2 with GQA (4 query heads on 2 kv heads), weights moved off their init (the zero c_proj
    would hide the blocks) so every tensor matters."""
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=sequence_len, vocab_size=tok.get_vocab_size(), n_layer=n_layer, n_head=4, n_kv_head=2,
                       n_embd=64, **options)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tok, tmp_path_factory):
    model = tiny_gpt(tok)
    folder = export_hf(model, tok, tmp_path_factory.mktemp("hf") / "tiny")
    return model, folder


def hf_model(folder, **options):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True,
                                                                    **options)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    return model.eval()


# ---------------------------------------------------------------------------------------------
# the model

def test_folder_has_the_hf_files_and_only_weights(tok, tmp_path):
    model = tiny_gpt(tok, molegrad_rank_k=4, molegrad_targets="all")  # MoleGrad buffers must stay out
    export_hf(model, tok, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == HF_FILES
    hf = transformers.NanoChatForCausalLM(transformers.AutoConfig.from_pretrained(tmp_path))
    assert set(load_file(tmp_path / WEIGHTS_FILE)) == set(hf.state_dict())
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["num_key_value_heads"] == 2 and config["model_type"] == "nanochat"


def test_logits_match_transformers_past_the_training_context(exported):
    model, folder = exported
    hf = hf_model(folder)
    torch.manual_seed(1)
    idx = torch.randint(0, model.config.vocab_size, (3, 200))  # 200 > sequence_len 32, many rotary periods
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert ours.abs().max() > 1.0  # not a trivially flat model
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_greedy_generation_matches_transformers(exported):
    model, folder = exported
    hf = hf_model(folder)
    prompt = [SPECIAL_TOKENS.index("<|bos|>") + model.config.vocab_size - len(SPECIAL_TOKENS), 17, 42, 99, 5]
    ours = model.generate(prompt, max_tokens=32, temperature=0.0)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert out[0, len(prompt):].tolist() == ours
    assert len(set(ours)) > 1


def test_round_trip_is_byte_identical(exported, tmp_path):
    model, folder = exported
    imported, tokenizer = load_hf(folder)
    again = export_hf(imported, tokenizer, tmp_path / "again")
    for name in HF_FILES:
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name
    for (name, a), b in zip(model.state_dict().items(), imported.state_dict().values()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------
# recipe pieces: model_type nanochat_mole, transformers' NanoChat + the pieces in remote code

@pytest.fixture(scope="module", params=RECIPE_PIECE_SETS, ids="+".join)
def exported_pieces(tok, tmp_path_factory, request):
    """3 layers: backout after layer 1 (not the last, where the final norm would hide it), value
    embeddings on layers 0 and 2."""
    model = tiny_gpt(tok, n_layer=3, **{name: True for name in request.param})
    folder = export_hf(model, tok, tmp_path_factory.mktemp("hf_pieces") / "+".join(request.param))
    return model, folder


def test_pieces_export_as_remote_code_that_plain_transformers_refuses(exported_pieces):
    model, folder = exported_pieces
    assert sorted(p.name for p in folder.iterdir()) == sorted(HF_FILES + [RECIPE_CODE_FILE])
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["model_type"] == "nanochat_mole" and config["architectures"] == ["NanoChatMoleForCausalLM"]
    assert {name for name in RECIPE_PIECES if config[name]} == set(model.config.recipe_pieces())
    with pytest.raises(ValueError, match="trust_remote_code"):  # transformers asks before it runs our code
        transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False)


def test_pieces_logits_and_greedy_generation_match_transformers(exported_pieces):
    model, folder = exported_pieces
    hf = hf_model(folder, trust_remote_code=True)
    assert type(hf).__name__ == "NanoChatMoleForCausalLM"
    assert set(hf.state_dict()) == set(load_file(folder / WEIGHTS_FILE))
    torch.manual_seed(1)
    idx = torch.randint(0, model.config.vocab_size, (3, 100))
    with torch.no_grad():
        ours, out = model(idx), hf(idx, output_hidden_states=True)
    torch.testing.assert_close(out.logits, ours, rtol=0, atol=1e-4)
    assert len(out.hidden_states) == model.config.n_layer + 1  # transformers' output capture still works
    prompt = [17, 42, 99, 5, 7, 250]
    expected = model.generate(prompt, max_tokens=24, temperature=0.0)
    with torch.no_grad():
        # eos_token_id=[]: no stop and no suppression of the stop tokens (min_new_tokens would suppress
        # <|bos|>, which our generate does not), so both pick the plain argmax every step
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, eos_token_id=[], do_sample=False)
    assert out[0, len(prompt):].tolist() == expected and len(set(expected)) > 1


def test_smear_gate_refuses_a_cache_it_did_not_fill_or_that_was_cropped(tok, tmp_path):
    from transformers import DynamicCache

    folder = export_hf(tiny_gpt(tok, n_layer=3, smear_gate=True), tok, tmp_path / "smear")
    hf = hf_model(folder, trust_remote_code=True)
    ids = torch.tensor([[17, 42, 99, 5]])
    with torch.no_grad():
        cache = hf(ids, use_cache=True).cache
        hf(ids[:, :1], cache=cache)  # a cache this forward filled: fine
        cache.crop(-2)  # 5 -> 3 tokens, rolled back as assisted decoding does: its carried embedding is stale
        with pytest.raises(ValueError, match="smear gate: this cache holds 3 tokens") as e:
            hf(ids[:, :1], cache=cache)
        assert "\n" not in str(e.value)
        foreign = DynamicCache(config=hf.config)
        hf(ids, cache=foreign)
        delattr(foreign, "nanochat_prev_embedding")  # as if filled by other code
        with pytest.raises(ValueError, match="is missing"):
            hf(ids[:, :1], cache=foreign)


def test_pieces_round_trip_is_byte_identical(exported_pieces, tmp_path):
    model, folder = exported_pieces
    imported, tokenizer = load_hf(folder)
    assert imported.config.recipe_pieces() == model.config.recipe_pieces()
    again = export_hf(imported, tokenizer, tmp_path / "again")
    for name in HF_FILES + [RECIPE_CODE_FILE]:
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name
    for (name, a), b in zip(model.state_dict().items(), imported.state_dict().values()):
        assert torch.equal(a, b), name


def test_each_piece_changes_the_logits(tok):
    """The parity above could hold with a piece silently dropped on both sides: it must matter. The
    piece model gets the plain model's weights, so only the piece's own parameters differ."""
    idx = torch.randint(0, tok.get_vocab_size(), (2, 20), generator=torch.Generator().manual_seed(0))
    plain = tiny_gpt(tok, n_layer=3)
    for piece in RECIPE_PIECES:
        model = tiny_gpt(tok, n_layer=3, **{piece: True})
        result = model.load_state_dict(plain.state_dict(), strict=False)
        assert not result.unexpected_keys and result.missing_keys  # the piece's parameters keep their values
        with torch.no_grad():
            assert (model(idx) - plain(idx)).abs().max() > 1e-3, piece


def test_plain_export_over_a_recipe_folder_removes_the_code(exported_pieces, tok, tmp_path):
    _, folder = exported_pieces
    target = shutil.copytree(folder, tmp_path / "reused")
    export_hf(tiny_gpt(tok), tok, target)
    assert sorted(p.name for p in target.iterdir()) == HF_FILES


def test_recipe_config_with_a_bad_piece_value_is_one_line(exported_pieces, tmp_path):
    _, folder = exported_pieces
    with pytest.raises(HFFormatError, match=r"smear_gate is 'yes', expected true or false") as e:
        load_hf(broken_copy(folder, tmp_path, smear_gate="yes"))
    assert "\n" not in str(e.value)


def sft_batch(tok: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = tok.render_conversation({"messages": [
        {"role": "user", "content": "the model learns"},
        {"role": "assistant", "content": [{"type": "text", "text": "the gradient "},
                                          {"type": "python", "text": "12 + 345"},
                                          {"type": "python_output", "text": "357"}]},
    ]}, max_tokens=None)
    x = torch.tensor([ids[:-1]] * 2)
    y = torch.tensor([[t if m else -1 for t, m in zip(ids[1:], mask[1:])]] * 2)
    return x, y


def sft_losses(model: GPT, tok: Tokenizer, steps: int = 3) -> list[float]:
    model.train()
    optimizers = setup_optimizers(model)
    x, y = sft_batch(tok)
    losses = []
    for _ in range(steps):
        loss = model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad()
        losses.append(loss.item())
    return losses


def test_imported_model_continues_sft_with_the_same_losses(tok, exported):
    model, folder = exported
    original = tiny_gpt(tok)  # a fresh copy of the exported weights: the fixture's model stays untouched
    imported, imported_tok = load_hf(folder)
    assert imported_tok.mergeable_ranks == tok.mergeable_ranks
    expected = sft_losses(original, tok)
    assert expected[-1] < expected[0]
    assert sft_losses(imported, imported_tok) == expected


def test_import_with_molegrad_options_keeps_the_weights(exported):
    model, folder = exported
    imported, _ = load_hf(folder, molegrad_rank_k=4, sequence_len=64)
    assert imported.config.molegrad_rank_k == 4 and imported.config.sequence_len == 64
    assert torch.equal(imported.transformer.h[1].mlp.c_fc.weight, model.transformer.h[1].mlp.c_fc.weight)


def test_tied_hub_model_without_lm_head_imports(exported, tmp_path):
    _, folder = exported
    shutil.copytree(folder, tmp_path / "tied")
    tensors = load_file(folder / WEIGHTS_FILE)
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "tied" / WEIGHTS_FILE)
    edit_config(tmp_path / "tied", tie_word_embeddings=True)
    imported, _ = load_hf(tmp_path / "tied")
    assert torch.equal(imported.lm_head.weight, imported.transformer.wte.weight)


# ---------------------------------------------------------------------------------------------
# the tokenizer

@pytest.fixture(scope="module")
def corpus_tok(tmp_path_factory):
    """A tokenizer trained on 1 MB of the local corpus, exported, and the texts."""
    from nanochat.local_corpus import local_shards

    shards, _ = local_shards(target_mb=1, val_fraction=0.05, shard_mb=8)
    texts = [doc for shard in shards for doc in shard]
    assert sum(len(t) for t in texts) >= 1_000_000
    tokenizer = Tokenizer.train_from_iterator(texts[::2], 2048)  # encode also text it was not trained on
    folder = tmp_path_factory.mktemp("hf_tok")
    export_tokenizer(tokenizer, folder, model_max_length=1 << 20)
    return tokenizer, transformers.AutoTokenizer.from_pretrained(folder), texts


EDGE_CASES = [
    "", " ", "\n\n\n", "   leading and trailing   ", "\t\ttabs\r\nand CRLF\r\n",
    "🦊🦊 fox emoji, 👩‍👩‍👧 ZWJ family, 🇫🇷 flag", "naïve café résumé", "e\u0301 combining", "日本語のテキスト", "한국어", "Ελληνικά",
    "مرحبا بالعالم", "12345678901234567890", "3.14159 -42 1e-10", "\u00a0no-break\u2009thin\u3000ideographic spaces",
    "don't I'LL we've", "<|bos|> looks special but is text", "<|user_start|><|assistant_end|>", "<|bos", "\x00\x01 control",
    "a" * 5000, " " * 300 + "x",
]


def test_tokenizer_ids_match_transformers_on_1mb_of_local_corpus(corpus_tok):
    ours, theirs, texts = corpus_tok
    expected = ours.encode(texts)
    got = theirs(texts, add_special_tokens=False)["input_ids"]
    mismatched = [i for i, (a, b) in enumerate(zip(got, expected)) if a != b]
    assert not mismatched, f"{len(mismatched)} of {len(texts)} documents differ, first: {texts[mismatched[0]][:80]!r}"
    for ids, text in zip(got[:50], texts):
        assert theirs.decode(ids) == text


@pytest.mark.parametrize("text", EDGE_CASES)
def test_tokenizer_edge_cases_match_and_decode_back(corpus_tok, text):
    ours, theirs, _ = corpus_tok
    ids = ours.encode(text)
    # ours never reads special tokens out of text; transformers does unless told not to
    assert theirs(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == ids
    assert theirs.decode(ids) == text == ours.decode(ids)


def test_special_tokens_map_to_our_ids(corpus_tok):
    ours, theirs, _ = corpus_tok
    for name in SPECIAL_TOKENS:
        assert theirs.convert_tokens_to_ids(name) == ours.encode_special(name)
    text = "<|user_start|>hi<|user_end|>"
    assert theirs(text, add_special_tokens=False)["input_ids"] == [ours.encode_special("<|user_start|>"), *ours.encode("hi"),
                                                                   ours.encode_special("<|user_end|>")]


def random_conversation(rng: random.Random) -> dict:
    def text() -> str:
        words = [rng.choice(WORDS + ["🦊", "café", "12", "345", "\n", "x = 2 * (3 + 4)"]) for _ in range(rng.randint(0, 12))]
        return " ".join(words)

    messages = [{"role": "system", "content": text()}] if rng.random() < 0.4 else []
    for _ in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": text()})
        if rng.random() < 0.5:
            content = text()
        else:  # tool use: text, call, output, ... never two text parts in a row
            content = []
            for _ in range(rng.randint(1, 3)):
                if rng.random() < 0.7:
                    content.append({"type": "text", "text": text()})
                content += [{"type": "python", "text": f"{rng.randint(1, 999)} * {rng.randint(1, 99)}"},
                            {"type": "python_output", "text": str(rng.randint(1, 99999))}]
            content.append({"type": "text", "text": text()})
        messages.append({"role": "assistant", "content": content})
    return {"messages": messages}


def template_ids(theirs, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    return list(theirs.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False))


def test_chat_template_renders_our_ids_for_20_conversations(corpus_tok):
    ours, theirs, _ = corpus_tok
    rng = random.Random(0)
    conversations = [random_conversation(rng) for _ in range(20)]
    assert any(m["role"] == "system" for c in conversations for m in c["messages"])
    assert any(isinstance(m["content"], list) for c in conversations for m in c["messages"])
    assert any(len(c["messages"]) >= 5 for c in conversations)
    for conversation in conversations:
        messages = conversation["messages"]
        assert template_ids(theirs, messages, False) == ours.render_conversation(conversation, max_tokens=None)[0]
        prompt = {"messages": messages[:-1]}  # ends with the user: what a caller asks to complete
        assert template_ids(theirs, prompt["messages"], True) == ours.render_for_completion(conversation)
        assert ours.render_for_completion(prompt) == ours.render_for_completion(conversation)


def test_chat_template_rejects_roles_out_of_order(corpus_tok):
    _, theirs, _ = corpus_tok
    with pytest.raises(Exception, match="roles must alternate"):
        template_ids(theirs, [{"role": "assistant", "content": "hi"}], True)


# ---------------------------------------------------------------------------------------------
# bad folders: one line naming what is wrong

def edit_config(folder, **changes) -> None:
    path = folder / CONFIG_FILE
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def broken_copy(folder, tmp_path, **changes):
    target = tmp_path / "broken"
    shutil.copytree(folder, target)
    if changes:
        edit_config(target, **changes)
    return target


@pytest.mark.parametrize("changes, error", [
    ({"model_type": "llama"}, r"config.json: model_type 'llama', expected 'nanochat'"),
    ({"hidden_act": "silu"}, r"our GPT lacks hidden_act='silu' \(ours: relu2\)"),
    ({"attention_bias": True, "final_logit_softcapping": None},
     r"our GPT lacks attention_bias=true \(ours: no biases\); final_logit_softcapping=None"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}, r"our GPT lacks rope .*linear"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
     r"our GPT lacks rope .*partial_rotary_factor"),
    ({"num_attention_heads": 0}, r"num_attention_heads is missing or not a positive integer"),
    ({"rms_norm_eps": 1e-3}, r"our GPT lacks rms_norm_eps=0.001"),
    ({"intermediate_size": 100}, r"our GPT lacks intermediate_size=100"),
    ({"vocab_size": 400}, r"config.json vocab_size 400 differs from tokenizer.json's 320 tokens"),
    ({"num_key_value_heads": 4}, r"self_attn.k_proj.weight has shape \(32, 64\), config.json implies \(64, 64\)"),
    ({"num_hidden_layers": 3}, r"missing \['model.layers.2.mlp.fc1.weight'"),
])
def test_bad_config_names_what_is_wrong(exported, tmp_path, changes, error):
    _, folder = exported
    with pytest.raises(HFFormatError, match=error) as e:
        load_hf(broken_copy(folder, tmp_path, **changes))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name, error", [
    ("config.json", "missing config.json in"),
    ("model.safetensors", r"missing model.safetensors in .* \(pytorch_model.bin is a pickle and is not read"),
    ("tokenizer.json", "missing tokenizer.json in"),
])
def test_missing_file_names_it(exported, tmp_path, name, error):
    _, folder = exported
    target = broken_copy(folder, tmp_path)
    (target / name).unlink()
    (target / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(HFFormatError, match=error):
        load_hf(target)


def test_extra_tensor_and_corrupt_weights_are_named(exported, tmp_path):
    _, folder = exported
    target = broken_copy(folder, tmp_path)
    tensors = load_file(folder / WEIGHTS_FILE)
    save_file({**tensors, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, target / WEIGHTS_FILE)
    with pytest.raises(HFFormatError, match=r"unexpected \['model.layers.0.self_attn.q_proj.bias'\]"):
        load_hf(target)
    (target / WEIGHTS_FILE).write_bytes(b"\x00" * 16)
    with pytest.raises(HFFormatError, match=f"cannot read {target / WEIGHTS_FILE}"):
        load_hf(target)
    with pytest.raises(HFFormatError, match="not a directory"):
        load_hf(tmp_path / "nowhere")


def test_export_refuses_a_tokenizer_of_another_vocab(tok, tmp_path):
    other = Tokenizer.train_from_iterator(tiny_corpus_texts(50, seed=2), 300)
    with pytest.raises(HFFormatError, match="model vocab_size 320 differs from the tokenizer's 300"):
        export_hf(tiny_gpt(tok), other, tmp_path)


# ---------------------------------------------------------------------------------------------
# entry points

def test_export_script_writes_a_folder_transformers_runs(base_dir, tmp_path):
    from nanochat.checkpoint import load_model
    from scripts import export_hf as export_script

    result = export_script.main(["-i", "base", "-c", "tiny", f"--out={tmp_path / 'out'}"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == HF_FILES and result["step"] == 10
    model, _ = load_model("base", "tiny")
    idx = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tmp_path / "out")(idx).logits, model(idx), rtol=0, atol=1e-4)


def test_export_script_on_a_base_trained_with_every_piece(base_dir, tmp_path, capsys):
    """base_train with the four model pieces -> export_hf -> transformers with trust_remote_code."""
    from nanochat.checkpoint import load_model
    from scripts import base_train
    from scripts import export_hf as export_script

    pieces = ["--layer_lambdas=True", "--smear_gate=True", "--backout=True", "--value_embeds=True"]
    base_train.main(TINY_BASE_TRAIN_ARGS + ["--depth=2", "--num_iterations=3", "--model_tag=pieces"] + pieces)
    capsys.readouterr()
    export_script.main(["-i", "base", "-c", "pieces", f"--out={tmp_path / 'out'}"])
    assert "trust_remote_code=True" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(HF_FILES + [RECIPE_CODE_FILE])
    model, _ = load_model("base", "pieces")
    assert model.config.recipe_pieces() == list(RECIPE_PIECES)
    idx = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        theirs = hf_model(tmp_path / "out", trust_remote_code=True)(idx).logits
        torch.testing.assert_close(theirs, model(idx), rtol=0, atol=1e-4)


def test_a_bf16_run_exports_its_weights_exactly_as_float32_and_says_so(base_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    from nanochat.checkpoint import checkpoint_dir, load_checkpoint
    from scripts import base_train
    from scripts import export_hf as export_script

    base_train.main(TINY_BASE_TRAIN_ARGS + ["--num_iterations=2", "--model_tag=bf16", "--param_dtype=bfloat16"])
    capsys.readouterr()
    export_script.main(["-i", "base", "-c", "bf16", f"--out={tmp_path / 'out'}"])
    assert capsys.readouterr().out.splitlines()[-1] == ("weights: float32 (the bfloat16 weights of a "
                                                         "--param_dtype=bfloat16 run, exactly: twice their size on disk)")
    saved, _, _ = load_checkpoint(checkpoint_dir("base", "bf16"), 2, load_rank_state=False)
    exported = load_file(tmp_path / "out" / "model.safetensors")
    assert saved["lm_head.weight"].dtype == torch.bfloat16 and exported["lm_head.weight"].dtype == torch.float32
    assert torch.equal(exported["lm_head.weight"], saved["lm_head.weight"].float())
    assert torch.equal(exported["model.embed_tokens.weight"], saved["transformer.wte.weight"].float())


def test_chat_sft_from_an_exported_folder_trains_exactly_like_the_checkpoint(base_dir, tmp_path, monkeypatch):
    import json

    from nanochat.checkpoint import last_step
    from scripts import chat_sft, export_hf as export_script

    # the identity conversations describe the training history, which a checkpoint knows and an
    # HF folder does not: both runs get the same (none), so that their batches are the same
    train_mixture = chat_sft.train_mixture
    monkeypatch.setattr(chat_sft, "train_mixture", lambda source, history: train_mixture(source))
    export_script.main(["-i", "base", "-c", "tiny", f"--out={tmp_path / 'hf'}"])
    sft = ["--max_seq_len=128", "--device_batch_size=4", "--task_source=offline", "--threads=1", "--dtype=float32",
           "--examples_per_step=8", "--eval_every=-1", "--eval_examples=8", "--eval_metrics_max_problems=0",
           "--num_iterations=3"]
    original = chat_sft.main(sft + ["-i", "base", "--source_tag=tiny", "--model_tag=from_checkpoint"])
    imported = chat_sft.main(sft + [f"--init_from_hf={tmp_path / 'hf'}", "--model_tag=from_hf"])
    assert imported["losses"] == original["losses"]  # same weights, same tokenizer ids, same batches
    directory = base_dir / "sft_checkpoints" / "from_hf"
    meta = json.loads((directory / f"meta_{last_step(directory):06d}.json").read_text())
    assert meta["tokenizer_dir"] == str(tmp_path / "hf")  # later readers of this checkpoint use that tokenizer


def test_export_script_needs_out(capsys):
    from scripts import export_hf as export_script

    with pytest.raises(SystemExit) as e:
        export_script.main(["-i", "base"])
    assert e.value.code == 2 and capsys.readouterr().err.strip().startswith("error: --out: expected the output folder")


def test_load_chat_model_init_from_hf(exported):
    from nanochat.checkpoint import load_chat_model
    from nanochat.config import CheckpointFlags

    model, folder = exported
    loaded, tokenizer, meta = load_chat_model(CheckpointFlags(init_from_hf=str(folder)), torch.device("cpu"))
    assert meta["checkpoint_dir"] == str(folder) and tokenizer.get_vocab_size() == model.config.vocab_size
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_load_model_from_hf_takes_the_run_overrides(exported):
    from nanochat.checkpoint import load_model

    model, folder = exported
    loaded, meta = load_model(hf_dir=folder, overrides={"recompute": "mlp", "sequence_len": 48})
    assert loaded.config.recompute == "mlp" and loaded.config.sequence_len == 48 and meta["model_config"]["n_kv_head"] == 2
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_sharded_hub_weights_import(exported, tmp_path):
    model, folder = exported
    target = broken_copy(folder, tmp_path)
    tensors = load_file(target / WEIGHTS_FILE)
    (target / WEIGHTS_FILE).unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k].to(torch.bfloat16) for k in keys}, target / shard)
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (target / "model.safetensors.index.json").write_text(json.dumps(index))
    imported, _ = load_hf(target)
    assert imported.lm_head.weight.dtype == torch.float32
    assert torch.equal(imported.lm_head.weight, model.lm_head.weight.to(torch.bfloat16).float())
    (target / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(HFFormatError, match="missing weights file .*model-00002-of-00002.safetensors"):
        load_hf(target)


def test_chat_cli_answers_from_an_hf_folder(exported):
    from scripts import chat_cli

    model, folder = exported
    tokenizer = Tokenizer.from_directory(folder)
    reply = chat_cli.main([f"--init_from_hf={folder}", "-p", "the model", "--max_tokens=6", "--temperature=0", "--device=cpu"])
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "the model"}]})
    expected = model.generate(prompt, max_tokens=6, temperature=0.0)
    stops = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    kept = list(itertools.takewhile(lambda t: t not in stops, expected))
    assert kept and reply == tokenizer.decode(kept)


def test_hub_style_config_is_accepted(exported, tmp_path):
    """transformers 4.x keys (rope_theta at the top, torch_dtype), eps 1e-6, no head_dim: still ours."""
    model, folder = exported
    target = broken_copy(folder, tmp_path)
    config = json.loads((target / CONFIG_FILE).read_text())
    for key in ("rope_parameters", "head_dim", "dtype"):
        del config[key]
    config.update(rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-6, torch_dtype="bfloat16")
    (target / CONFIG_FILE).write_text(json.dumps(config))
    imported, _ = load_hf(target)
    assert imported.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), imported.state_dict().values()))


# ---------------------------------------------------------------------------------------------
# a fresh process with stdin closed, as a script or notebook runs: the tokenizer and the README's
# example load without a prompt or a warning, for both kinds

README = Path(__file__).resolve().parents[1] / "README.md"
README_MARKER = "<!-- export example: tests/test_hf.py runs this block -->"
PROMPT = "Do you wish to run the custom code"


@pytest.fixture(scope="module", params=["nanochat", "nanochat_mole"])
def export_kind(tok, request) -> tuple[str, GPT]:
    """A model of each export kind: plain, or with every recipe piece (its own code), with a context
    long enough for the README's generation."""
    pieces = {name: True for name in RECIPE_PIECES} if request.param == "nanochat_mole" else {}
    return request.param, tiny_gpt(tok, n_layer=3, sequence_len=256, **pieces)


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """`code` in a new interpreter, stdin closed (a prompt would read EOF), offline, with its own
    HF_HOME (transformers copies remote code under it)."""
    env = {**os.environ, "HF_HOME": str(cwd / "hf_home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=300)


# torchao's import noise, whatever folder is loaded: the lowmem extra installs torchao and transformers
# imports it when it loads a model; its prebuilt kernels for other Pythons/GPUs fail to load, and torch
# notes its pytree registrations. Not about our folder, so not counted.
TORCHAO_IMPORT_NOISE = re.compile(r"Failed to load \S*/torchao/_C|_pytree\.py:\d+\] <enum '\w+'> is an Enum subclass")


def unexpected_output(stderr: str) -> list[str]:
    """What stderr says besides transformers' "Loading weights" progress bar (and torchao's import
    noise): warnings, prompts, errors."""
    return [line for line in re.split(r"[\r\n]+", stderr) if line.strip() and not line.lstrip().startswith("Loading weights")
            and not TORCHAO_IMPORT_NOISE.search(line)]


@pytest.mark.multiprocess
def test_tokenizer_loads_without_a_prompt_or_warning_and_encodes_like_ours(export_kind, tok, tmp_path):
    """A nanochat_mole folder's config.json names its own code, and AutoTokenizer reads config.json
    first: it takes trust_remote_code=True as the model does (without it transformers asks)."""
    kind, model = export_kind
    export_hf(model, tok, tmp_path / "export")
    remote = ", trust_remote_code=True" if kind == "nanochat_mole" else ""
    texts = ["the model learns", "print(12 + 345)\n🦊 naïve café", "<|user_start|> as text", ""]
    result = run_python(f"""
import json
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("export"{remote})
texts = {texts!r}
print(json.dumps([tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] for text in texts]))
""", tmp_path)
    assert result.returncode == 0, result.stderr
    assert PROMPT not in result.stdout and not unexpected_output(result.stderr), result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == [tok.encode(text) for text in texts]


def readme_export_block() -> str:
    text = README.read_text(encoding="utf-8")
    assert README_MARKER in text, f"README.md lacks the line {README_MARKER!r} before its export example's python block"
    block = re.match(r"\s*```python\n(.*?)\n```", text.split(README_MARKER, 1)[1], re.S)
    assert block, f"README.md: expected a ```python block right after {README_MARKER!r}"
    return block.group(1)


@pytest.mark.multiprocess
def test_readme_export_example_runs_as_written(export_kind, tok, tmp_path):
    """The block after the README's marker, unchanged, in a directory where the folder it names
    (its first `name = "relative/path"` line) holds an export of each kind."""
    kind, model = export_kind
    code = readme_export_block()
    folder = re.search(r"^\w+ = [\"']([^\"']+)[\"']", code, re.M)
    assert folder and not Path(folder.group(1)).is_absolute(), \
        f"README.md's export example should name its folder as a relative path in a variable (folder = \"hf/d12\"):\n{code}"
    export_hf(model, tok, tmp_path / folder.group(1))
    result = run_python(code, tmp_path)
    assert result.returncode == 0, f"the README's export example fails on a {kind} folder:\n{result.stderr}"
    assert PROMPT not in result.stdout and not unexpected_output(result.stderr), result.stderr
