"""The recipe pieces (upstream nanochat, 2026; docs/recipe.md), each a flag that is off by default.

Model: layer lambdas, smear gate, backout, value embeddings: shapes, causality, KV-cache and Engine
decode equal the full forward, recompute, MoleGrad (HF export: tests/test_hf.py). Optimizer: Polar Express
against a slow reference of its polynomials, NorMuon and cautious weight decay against slow
per-element loops, weight decay scaled by width, low-rank momentum refusals. With everything on:
two gloo processes equal one, base_train and mid_train resume bit-exactly. The auto batch size."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat import distributed
from nanochat.common import RunContext
from nanochat.distributed import TIMEOUT_ENV
from nanochat import engine as engine_module
from nanochat.engine import Engine, KVCache
from nanochat.gpt import GPT, RECIPE_PIECES, GPTConfig, config_from_depth
from nanochat.optim import (
    POLAR_EXPRESS_COEFFICIENTS,
    WEIGHT_DECAY_REF_WIDTH,
    Muon,
    normuon_variance_step,
    setup_optimizers,
    zeropower_via_newtonschulz5,
    zeropower_via_polar_express,
)
from nanochat.molegrad import molegrad_layers
from nanochat.trainer import auto_total_batch_size, scaling_params, train_step
from scripts import base_train
from tests.helpers import (
    MID_TRAIN_ARGS,
    RECIPE_PIECE_SETS,
    TINY_BASE_TRAIN_ARGS,
    VOCAB,
    copy_checkpoint,
    random_tokens,
    tiny_model,
)

torch.set_num_threads(1)


def recipe_model(pieces: tuple[str, ...], dtype: torch.dtype = torch.float64, seed: int = 0, **overrides) -> GPT:
    """test_gpt's tiny model (every parameter perturbed, so that zero-initialised pieces such as
    smear_lambda carry signal) with 3 layers: backout after layer 1, value embeddings on 0 and 2."""
    return tiny_model(dtype, seed, **{"n_layer": 3, **{name: True for name in pieces}, **overrides})


# ---------------------------------------------------------------------------------------------
# model pieces

def test_pieces_are_off_by_default_and_add_only_their_parameters():
    plain = recipe_model(())
    assert GPTConfig().recipe_pieces() == [] and not any(getattr(GPTConfig(), name) for name in RECIPE_PIECES)
    names = {name for name, _ in plain.named_parameters()}
    kv_dim = 2 * 8
    extra = {
        "layer_lambdas": {"resid_lambdas": (3,), "x0_lambdas": (3,)},
        "smear_gate": {"smear_gate.weight": (1, 24), "smear_lambda": (1,)},
        "backout": {"backout_lambda": (1,)},
        "value_embeds": {"value_embeds.0.weight": (VOCAB, kv_dim), "value_embeds.2.weight": (VOCAB, kv_dim),
                         "transformer.h.0.attn.ve_gate.weight": (2, 12), "transformer.h.2.attn.ve_gate.weight": (2, 12)},
    }
    for piece, shapes in extra.items():
        model = recipe_model((piece,))
        params = dict(model.named_parameters())
        assert set(params) - names == set(shapes), piece
        assert {name: tuple(params[name].shape) for name in shapes} == shapes, piece


def test_init_matches_upstream_values():
    model = GPT(GPTConfig(sequence_len=16, vocab_size=VOCAB, n_layer=3, n_head=2, n_kv_head=2, n_embd=32,
                          layer_lambdas=True, smear_gate=True, backout=True, value_embeds=True))
    assert torch.allclose(model.resid_lambdas, torch.tensor([1.15, 1.10, 1.05]))
    assert torch.allclose(model.x0_lambdas, torch.tensor([0.20, 0.125, 0.05]))
    assert model.smear_lambda.item() == 0.0 and model.backout_lambda.item() == pytest.approx(0.2)
    gate = model.smear_gate.weight
    assert gate.min() >= 0 and gate.max() <= 0.02
    bound = math.sqrt(3 / 32)
    assert model.value_embeds["0"].weight.abs().max() <= bound
    assert model.transformer.h[1].attn.ve_gate is None


@pytest.mark.parametrize("pieces", RECIPE_PIECE_SETS, ids="+".join)
def test_shapes_and_causality_with_each_piece(pieces):
    model = recipe_model(pieces)
    idx = random_tokens(2, 12)
    logits = model(idx)
    assert logits.shape == (2, 12, VOCAB)
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % VOCAB
    other = model(changed)
    assert torch.equal(other[:, :7], logits[:, :7])  # earlier positions never see a later token
    assert not torch.allclose(other[:, 7:], logits[:, 7:])
    loss = model(idx, idx)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())  # every piece learns


@pytest.mark.parametrize("pieces", RECIPE_PIECE_SETS, ids="+".join)
def test_kv_cache_decode_equals_full_forward(pieces):
    """Prefill 5 tokens, a 3-token chunk after them, then one token at a time; also a batch-1 prefill
    copied to batch 2 (the Engine's path). Every position's logits equal the full forward's."""
    model = recipe_model(pieces).eval()
    idx = random_tokens(1, 14)
    with torch.inference_mode():
        full = model(idx)
        cache = KVCache(1, 2, 14, 8, 3)
        pieces_out = [model(idx[:, :5], kv_cache=cache), model(idx[:, 5:8], kv_cache=cache)]
        pieces_out += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(8, 14)]
        assert torch.allclose(torch.cat(pieces_out, dim=1), full, atol=1e-12, rtol=0)

        prompt = KVCache(1, 2, 5, 8, 3)
        model(idx[:, :5], kv_cache=prompt)
        batch = KVCache(2, 2, 14, 8, 3)
        batch.prefill(prompt)
        decoded = [model(idx[:, t:t + 1].expand(2, 1), kv_cache=batch) for t in range(5, 14)]
        assert torch.allclose(torch.cat(decoded, dim=1), full[:, 5:].expand(2, -1, -1), atol=1e-12, rtol=0)
        cache.reset()
        assert cache.prev_embedding is None
        assert torch.allclose(model(idx[:, :4], kv_cache=cache), full[:, :4], atol=1e-12, rtol=0)


@pytest.mark.parametrize("prefill_chunk", [engine_module.PREFILL_CHUNK, 3])
def test_engine_decode_equals_full_recompute_with_every_piece(monkeypatch, prefill_chunk):
    """The Engine's own path: chunked prefill at batch 1, the cache copied to 2 samples, then decode."""
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", prefill_chunk)
    model = recipe_model(RECIPE_PIECES).eval()
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
    reference = model.generate(prompt, max_tokens=20, temperature=0.0)
    sequences, _ = Engine(model, None).generate_batch(prompt, num_samples=2, max_tokens=20, temperature=0.0)
    assert sequences == [prompt + reference] * 2


@pytest.mark.parametrize("recompute", ["mlp", "block"])
def test_recompute_gives_the_same_gradients_with_all_pieces(recompute):
    idx = random_tokens(2, 12)
    grads = []
    for mode in ("none", recompute):
        model = recipe_model(RECIPE_PIECES, recompute=mode)
        model(idx, idx).backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, atol=1e-12, rtol=0), name


def test_molegrad_trains_with_all_pieces():
    model = recipe_model(RECIPE_PIECES, dtype=torch.float32, molegrad_rank_k=4, molegrad_targets="all")
    optimizers = setup_optimizers(model, normuon=True, cautious_weight_decay=True, orthogonalizer="polar_express",
                                  weight_decay=0.1)
    idx = random_tokens(2, 16)
    losses = []
    for _ in range(4):
        loss = model(idx, idx)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_every_parameter_is_in_exactly_one_optimizer_group():
    model = recipe_model(RECIPE_PIECES)
    adamw, muon = setup_optimizers(model)
    grouped = [id(p) for opt in (adamw, muon) for group in opt.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    assert len(adamw.param_groups) == 2 + 4  # lm_head, wte | value embeds, resid, x0, smear + backout
    ve_gate = model.transformer.h[0].attn.ve_gate.weight
    assert any(p is ve_gate for p in muon.param_groups[0]["params"])
    plain_adamw, _ = setup_optimizers(recipe_model(()))
    assert len(plain_adamw.param_groups) == 2


# ---------------------------------------------------------------------------------------------
# optimizer pieces

def slow_polar_express(g: torch.Tensor, steps: int) -> torch.Tensor:
    """The plain iteration X <- a X + b (X Xᵀ) X + c (X Xᵀ)² X with Polar Express's per-step
    coefficients, float64, no transposes: the reference."""
    x = g.double() / (torch.linalg.matrix_norm(g.double()) * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFICIENTS[:steps]:
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
@pytest.mark.parametrize("steps", [1, 3, 5])
def test_polar_express_equals_its_slow_reference(shape, steps):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fast = zeropower_via_polar_express(g, steps, torch.float64)
    assert torch.allclose(fast, slow_polar_express(g, steps), atol=1e-10, rtol=0)


def test_polar_express_orthogonalises_better_than_newton_schulz():
    """Singular values from 1e-2 to 1: after 5 steps Polar Express puts all of them within 0.15 of
    1; the fixed Newton–Schulz quintic leaves some more than 0.3 away."""
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 32, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(32, 32, generator=gen, dtype=torch.float64))
    g = (u * torch.logspace(-2, 0, 32, dtype=torch.float64)) @ v.T  # (64, 32)
    polar = torch.linalg.svdvals(zeropower_via_polar_express(g, 5, torch.float32).double())
    newton = torch.linalg.svdvals(zeropower_via_newtonschulz5(g, 5, torch.float32).double())
    assert (polar - 1).abs().max() < 0.15, polar
    assert (newton - 1).abs().max() > 0.3, newton
    with pytest.raises(ValueError, match="expected 1 <= steps <= 5"):
        zeropower_via_polar_express(g, 6)


def slow_normuon(ortho: torch.Tensor, variance: list[float], beta2: float) -> torch.Tensor:
    """Per-row (rows >= cols) or per-column loops of NorMuon's variance step; `variance` updated."""
    rows, cols = ortho.shape
    per_row = rows >= cols
    lines = [[ortho[i][j].item() for j in range(cols)] for i in range(rows)]
    if not per_row:
        lines = [list(column) for column in zip(*lines)]
    out = []
    for k, line in enumerate(lines):
        mean_square = sum(x * x for x in line) / len(line)
        variance[k] = beta2 * variance[k] + (1 - beta2) * mean_square
        out.append([x / math.sqrt(max(variance[k], 1e-10)) for x in line])
    norm_before = math.sqrt(sum(x * x for line in lines for x in line))
    norm_after = math.sqrt(sum(x * x for line in out for x in line))
    out = [[x * norm_before / norm_after for x in line] for line in out]
    if not per_row:
        out = [list(row) for row in zip(*out)]
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(6, 4), (4, 6)])
def test_normuon_equals_a_slow_per_element_loop(shape):
    gen = torch.Generator().manual_seed(5)
    variance = torch.zeros((shape[0], 1) if shape[0] >= shape[1] else (1, shape[1]), dtype=torch.float64)
    reference = [0.0] * variance.numel()
    for _ in range(3):  # the EMA carries over steps
        ortho = torch.randn(*shape, generator=gen, dtype=torch.float64)
        fast = normuon_variance_step(ortho, variance, 0.9).double()
        slow = slow_normuon(ortho, reference, 0.9)
        assert torch.allclose(fast, slow, atol=1e-12, rtol=0)
        assert torch.allclose(variance.flatten(), torch.tensor(reference, dtype=torch.float64), atol=1e-12, rtol=0)
        assert float(fast.norm()) == pytest.approx(float(ortho.norm()), rel=1e-12)  # the Frobenius norm is kept


@pytest.mark.parametrize("normuon", [False, True])
def test_cautious_weight_decay_equals_a_slow_per_element_loop(normuon):
    """Two Muon steps on one (5, 3) matrix: decay only where the update O and W share a sign."""
    gen = torch.Generator().manual_seed(7)
    weight = torch.nn.Parameter(torch.randn(5, 3, generator=gen, dtype=torch.float64))
    lr, wd = 0.1, 0.5
    opt = Muon([weight], lr=lr, weight_decay=wd, nesterov=False, momentum=0.0, ns_dtype=torch.float64,
               cautious_weight_decay=True, normuon=normuon)
    expected = weight.detach().clone()
    variance = [0.0] * 5
    for _ in range(2):
        grad = torch.randn(5, 3, generator=gen, dtype=torch.float64)
        weight.grad = grad.clone()
        ortho = zeropower_via_newtonschulz5(grad, 5, torch.float64)
        if normuon:
            ortho = slow_normuon(ortho, variance, 0.9)
        scale = lr * math.sqrt(5 / 3)
        decayed = 0
        for i in range(5):
            for j in range(3):
                w, o = expected[i, j].item(), ortho[i, j].item()
                if o * w >= 0:
                    w -= lr * wd * w
                    decayed += 1
                expected[i, j] = w - scale * o
        assert 0 < decayed < 15  # the sign test matters in this case
        opt.step()
        assert torch.allclose(weight.detach(), expected, atol=1e-6, rtol=0)


def test_plain_weight_decay_scales_with_width():
    model = recipe_model((), n_embd=64)
    _, muon = setup_optimizers(model, weight_decay=0.2, weight_decay_by_width=True)
    assert muon.param_groups[0]["weight_decay"] == pytest.approx(0.2 * (WEIGHT_DECAY_REF_WIDTH / 64) ** 2)
    _, muon = setup_optimizers(model, weight_decay=0.2)
    assert muon.param_groups[0]["weight_decay"] == 0.2


def test_lowrank_momentum_refuses_normuon_and_cautious_decay():
    model = recipe_model((), molegrad_rank_k=4, molegrad_momentum="lowrank")
    with pytest.raises(ValueError, match=r"^normuon=True: needs the dense update"):
        setup_optimizers(model, normuon=True)
    with pytest.raises(ValueError, match=r"^cautious_weight_decay=True: needs the dense update"):
        setup_optimizers(model, cautious_weight_decay=True)
    setup_optimizers(model, orthogonalizer="polar_express")  # an odd polynomial: fine in the subspace


# ---------------------------------------------------------------------------------------------
# DDP: two gloo processes (sharded AdamW and Muon, MoleGrad factors all-reduced) against one

def ddp_recipe_rank(rank: int, world_size: int, work_dir: str) -> None:
    """3 steps of a float64 model with every piece on (MoleGrad with dense momentum on every Linear,
    so NorMuon and cautious decay run on replicated matrices too) on this rank's rows."""
    if world_size > 1:
        torch.set_num_threads(1)
        distributed.init_process_group("gloo", init_method=f"file://{work_dir}/store", rank=rank, world_size=world_size)
    ctx = RunContext(torch.device("cpu"), "cpu", torch.float32, world_size > 1, rank, rank, world_size)  # no autocast
    try:
        model = recipe_model(RECIPE_PIECES, molegrad_rank_k=4, molegrad_targets="attn_only")
        for layer in molegrad_layers(model):
            layer.reset_subspace()  # Q orthonormal in float64
        optimizers = setup_optimizers(model, weight_decay=0.1, orthogonalizer="polar_express", normuon=True,
                                      cautious_weight_decay=True)
        optimizers[1].ns_dtype = torch.float64
        generator = torch.Generator().manual_seed(11)
        rows = 4 // world_size
        losses = []
        for _ in range(3):
            tokens = torch.randint(0, VOCAB, (4, 17), generator=generator)
            batch = (tokens[rank * rows:(rank + 1) * rows, :-1], tokens[rank * rows:(rank + 1) * rows, 1:])
            loss, _ = train_step(model, optimizers, iter([batch]), 1, ctx)
            losses.append(loss)
        torch.save({"losses": losses, "model": model.state_dict()}, Path(work_dir) / f"w{world_size}_r{rank}.pt")
        if world_size > 1:
            dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        if world_size > 1:
            dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_processes_equal_one_with_every_piece_on(tmp_path, monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, "60")
    ddp_recipe_rank(0, 1, str(tmp_path))
    mp.spawn(ddp_recipe_rank, args=(2, str(tmp_path)), nprocs=2, join=True)
    single, rank0, rank1 = (torch.load(tmp_path / name, weights_only=True) for name in ("w1_r0.pt", "w2_r0.pt", "w2_r1.pt"))
    assert rank0["losses"] == pytest.approx(single["losses"], rel=1e-12)
    assert "value_embeds.0.weight" in single["model"] and "resid_lambdas" in single["model"]
    for name, value in single["model"].items():
        torch.testing.assert_close(rank0["model"][name], value, rtol=1e-10, atol=1e-12, msg=name)
        assert torch.equal(rank0["model"][name], rank1["model"][name]), name


# ---------------------------------------------------------------------------------------------
# end to end: base_train

OPTIMIZER_ON = ["--muon_orthogonalizer=polar_express", "--normuon=True", "--cautious_weight_decay=True",
                "--weight_decay_by_width=True", "--weight_decay=0.1"]
ALL_ON = ["--layer_lambdas=True", "--smear_gate=True", "--backout=True", "--value_embeds=True", *OPTIMIZER_ON, "--depth=2"]


def test_resume_is_bit_exact_with_every_piece_on(base_dir):
    args = TINY_BASE_TRAIN_ARGS + ALL_ON + ["--num_iterations=6", "--eval_every=-1", "--save_every=3", "--keep_checkpoints=0"]
    full = base_train.main(args + ["--model_tag=full"])
    base_train.main(args + ["--model_tag=resumed"])
    resumed = base_train.main(args + ["--model_tag=resumed", "--resume_from_step=3"])
    assert resumed["losses"] == full["losses"][3:]  # floats compared exactly
    directory = base_dir / "base_checkpoints"
    a = torch.load(directory / "full" / "model_000006.pt", weights_only=True)
    b = torch.load(directory / "resumed" / "model_000006.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "value_embeds.1.weight" in a and "smear_lambda" in a


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--normuon=True", "--molegrad=True", "--molegrad_rank_k=4", "--molegrad_momentum=lowrank"],
         "--normuon=True: needs the dense update of every matrix"),
        (["--cautious_weight_decay=True", "--molegrad=True", "--memory_mode=lowest"],
         "--cautious_weight_decay=True: needs the dense update of every matrix"),
        (["--muon_orthogonalizer=svd"], "--muon_orthogonalizer: expected one of newton_schulz|polar_express"),
        (["--normuon_beta2=1.0"], "--normuon_beta2=1.0: expected a value in [0, 1)"),
        (["--resume_from_step=10", "--model_tag=tiny", "--num_iterations=12", "--value_embeds=True"],
         "--value_embeds: the checkpoint at step 10 in "),
    ],
)
def test_bad_recipe_flags_are_one_clear_line(base_dir, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        base_train.main(TINY_BASE_TRAIN_ARGS + ["--num_iterations=2"] + argv)
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


# ---------------------------------------------------------------------------------------------
# automatic total batch size

def test_auto_total_batch_size_follows_the_power_law():
    ref = config_from_depth(12, 32768, 2048)
    assert scaling_params(ref) == 12 * 12 * 768 ** 2 + 32768 * 768  # upstream's d12: 110,100,480
    assert auto_total_batch_size(ref, ref, 2048 * 32) == 2 ** 19
    for depth in (6, 20, 26):  # a power of two within a factor sqrt(2) of the power law
        config = config_from_depth(depth, 32768, 2048)
        predicted = 2 ** 19 * (scaling_params(config) / scaling_params(ref)) ** 0.383
        batch = auto_total_batch_size(config, ref, 2048)
        assert batch & (batch - 1) == 0 and 2 ** -0.5 <= batch / predicted <= 2 ** 0.5, (depth, batch, predicted)
    assert auto_total_batch_size(config_from_depth(20, 32768, 2048), ref, 2048) > 2 ** 19
    assert auto_total_batch_size(config_from_depth(1, 512, 32), config_from_depth(12, 512, 32), 3 * 32) % 96 == 0


def test_base_train_auto_batch_size(base_dir, capsys):
    out = base_train.main(TINY_BASE_TRAIN_ARGS + ["--total_batch_size=-1", "--num_iterations=1", "--eval_every=-1", "--model_tag=auto"])
    printed = capsys.readouterr().out
    tokens = int(printed.split("auto batch size: ")[1].split(" tokens")[0].replace(",", ""))
    assert tokens % (4 * 32) == 0 and f"= {tokens:,} tokens/step" in printed  # whole 4 x 32 passes, then used
    assert out["num_iterations"] == 1


# ---------------------------------------------------------------------------------------------
# later stages keep the checkpoint's pieces

def test_mid_train_keeps_the_pieces_and_resumes_bit_exactly(base_dir):
    from scripts import mid_train

    base_train.main(TINY_BASE_TRAIN_ARGS + ALL_ON + ["--num_iterations=2", "--eval_every=-1", "--model_tag=recipe"])
    run = MID_TRAIN_ARGS + OPTIMIZER_ON + ["--source_tag=recipe", "--num_iterations=4", "--eval_every=-1",
                                          "--save_every=2", "--keep_checkpoints=0"]
    full = mid_train.main(run + ["--model_tag=recipe_full"])
    copy_checkpoint(base_dir, "mid", "recipe_full", "recipe_resumed", 2)
    resumed = mid_train.main(run + ["--model_tag=recipe_resumed", "--resume_from_step=2"])
    assert resumed["losses"] == full["losses"][2:]  # floats compared exactly
    state = torch.load(base_dir / "mid_checkpoints" / "recipe_full" / "model_000004.pt", weights_only=True)
    assert "value_embeds.1.weight" in state and "backout_lambda" in state


def test_later_stages_take_no_model_piece_flags(base_dir, capsys):
    """The pieces shape the weights: base_train chooses them, later stages keep their checkpoint's."""
    from scripts import mid_train

    with pytest.raises(SystemExit) as e:
        mid_train.main(MID_TRAIN_ARGS + ["--source_tag=tiny", "--num_iterations=1", "--smear_gate=True"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --smear_gate: unknown flag (see --help)"], err
