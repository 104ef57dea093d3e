"""The precision options (nanochat/precision.py): stochastic rounding is unbiased and reproducible,
8-bit states take the nearest code of their block, the presets and flags, a training step with
bf16 weights against the fp32 step, exact resume with every option on, two gloo ranks against one
process, and a missing torchao as one line naming the extra.

The optimizer updates themselves (bf16 against fp32 weights, 8-bit against fp32 states) are tested
in tests/test_optim.py."""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat import distributed, precision
from nanochat.common import RunContext
from nanochat.config import ConfigError, UserError, format_help, parse_args_or_raise
from nanochat.gpt import GPT, GPTConfig
from nanochat.model_flags import MEMORY_MODES, MEMORY_SETTINGS, MemoryFlags
from nanochat.molegrad import MoleGradLinear
from nanochat.optim import AdamW, Muon, setup_optimizers
from nanochat.precision import (
    MISSING_TORCHAO,
    QUANT_BLOCK,
    OptimizerStates,
    StochasticRounding,
    gradient,
    prepare_parameters,
    stochastic_round_,
)
from nanochat.trainer import TrainFlags, train_step
from scripts import base_train
from tests.helpers import TINY_BASE_TRAIN_ARGS, needs_extra, same_tensors

torch.set_num_threads(1)
CPU = RunContext(torch.device("cpu"), "cpu", torch.float32, False, 0, 0, 1)  # no autocast
BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2^-7: the gap between bf16 neighbours is eps x 2^exponent
# width 64 so that the block matrices have 4096 values (MIN_QUANTIZED_NUMEL): their states go 8-bit
CONFIG = dict(sequence_len=16, vocab_size=128, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
EVERY_OPTION = dict(param_dtype="bfloat16", grad_dtype="float32", optim_state="int8")


def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(toward zero, away from zero): the two bf16 values around each fp32 value (equal when x is one)."""
    toward = (x.view(torch.int32) & -65536).view(torch.float32)
    away = ((x.view(torch.int32) & -65536) + 65536).view(torch.float32)
    return toward, torch.where(toward == x, toward, away)


# ---------------------------------------------------------------------------------------------
# stochastic rounding

def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    generator = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(200, generator=generator) * 10.0 ** torch.randint(-6, 3, (200,), generator=generator),
                        torch.tensor([1.0 + BF16_EPS / 4, -3.0 - 3 * 4 * BF16_EPS / 8, 0.0, -2.5])])  # offsets, exact values
    samples = 4096
    rounded = torch.empty(samples, values.numel(), dtype=torch.bfloat16)
    stochastic_round_(rounded, values.expand(samples, -1).contiguous(), generator)
    toward, away = bf16_neighbours(values)
    assert ((rounded.float() == toward) | (rounded.float() == away)).all()
    # Each sample is toward + gap * Bernoulli(p): the mean's standard deviation is at most gap / (2 sqrt(n))
    gap = (away - toward).abs()
    error = (rounded.float().mean(0) - values).abs()
    assert (error <= 5 * gap / (2 * samples ** 0.5) + 1e-30).all(), (error / gap).max()
    # round-to-nearest is biased by a quarter gap on 1 + eps/4: far outside that tolerance
    nearest = values.bfloat16().float()
    assert (nearest - values).abs()[-4] > 20 * gap[-4] / (2 * samples ** 0.5)


def test_stochastic_rounding_bits_depend_on_index_and_step_only():
    value = torch.full((1000,), 1.0 + BF16_EPS / 2)
    draws = {}
    for key in [(3, 1), (3, 1), (4, 1), (3, 2)]:
        out = torch.empty(1000, dtype=torch.bfloat16)
        StochasticRounding(seed=7, stream="Muon").round_into(out, value, *key)
        draws.setdefault(key, []).append(out)
    assert torch.equal(*draws[(3, 1)])  # reproducible: what every rank and a resumed run draw
    assert not torch.equal(draws[(3, 1)][0], draws[(4, 1)][0]) and not torch.equal(draws[(3, 1)][0], draws[(3, 2)][0])
    other_stream = torch.empty(1000, dtype=torch.bfloat16)
    StochasticRounding(seed=7, stream="AdamW").round_into(other_stream, value, 3, 1)
    assert not torch.equal(other_stream, draws[(3, 1)][0])


# ---------------------------------------------------------------------------------------------
# 8-bit states

@pytest.mark.parametrize("signed", [True, False])
def test_8bit_quantization_takes_the_nearest_code_of_each_block(signed):
    needs_extra("torchao", "lowmem")
    states = OptimizerStates("int8")
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(37, 101, generator=generator) * torch.rand(37, 1, generator=generator) ** 4  # 3737: a partial block
    values = values if signed else values.square()
    codes, scale = states.quantize(values, signed)
    assert codes.dtype == torch.uint8 and codes.numel() == scale.numel() * QUANT_BLOCK >= values.numel() > codes.numel() - QUANT_BLOCK
    blocks = torch.nn.functional.pad(values.reshape(-1), (0, codes.numel() - values.numel())).view(-1, QUANT_BLOCK)
    torch.testing.assert_close(scale, blocks.abs().amax(1), rtol=0, atol=0)
    # reference: the code whose value is nearest to value / block absmax, by brute force
    qmap = states.qmap(signed, values.device).double()
    normalized = (blocks / scale[:, None]).reshape(-1).double()
    nearest_error = (qmap[None, :] - normalized[:, None]).abs().min(1).values
    error = (qmap[codes.long()] - normalized).abs()
    assert (error <= nearest_error + 1e-7).all()
    # the bound: half the widest gap of the map, times the block's absmax
    restored = states.dequantize(codes, scale, signed)[:values.numel()].view_as(values)
    half_gap = (qmap[1:] - qmap[:-1]).max().item() / 2
    assert restored.shape == values.shape
    assert ((restored - values).abs() <= half_gap * scale.repeat_interleave(QUANT_BLOCK)[:values.numel()].view_as(values) + 1e-7).all()
    assert not torch.equal(restored, values)


def test_states_start_at_zero_convert_between_fp32_and_8bit_and_keep_small_tensors_fp32():
    needs_extra("torchao", "lowmem")
    int8 = OptimizerStates("int8")
    momentum = torch.randn(64, 65)  # 4160 values: 16 whole blocks and a part
    fresh = {}
    assert torch.equal(int8.load(fresh, "exp_avg_sq", momentum, signed=False), torch.zeros(64, 65))
    assert fresh["exp_avg_sq_codes"].shape == (17 * QUANT_BLOCK,) and fresh["exp_avg_sq_scale"].shape == (17,)
    state = {"momentum_buffer": momentum.clone()}  # saved by a float32 run
    loaded = int8.load(state, "momentum_buffer", momentum)
    assert set(state) == {"momentum_buffer_codes", "momentum_buffer_scale"} and OptimizerStates.holds(state, "momentum_buffer")
    assert 0 < (loaded - momentum).abs().max() <= 0.01 * momentum.abs().max()
    span = int8.load(state, "momentum_buffer", momentum, span=(2 * QUANT_BLOCK, 4160))  # from a block boundary to the end
    assert torch.equal(span, loaded.view(-1)[2 * QUANT_BLOCK:])
    int8.store(state, "momentum_buffer", span * 2, span=(2 * QUANT_BLOCK, 4160))
    both = int8.load(state, "momentum_buffer", momentum).view(-1)
    requantized = int8.dequantize(*int8.quantize(span * 2, True), True)[:span.numel()]  # blocks aligned: the same blocks
    assert torch.equal(both[:2 * QUANT_BLOCK], loaded.view(-1)[:2 * QUANT_BLOCK]) and torch.equal(both[2 * QUANT_BLOCK:], requantized)
    back = OptimizerStates("float32").load(state, "momentum_buffer", momentum)  # a float32 run resumes it
    assert set(state) == {"momentum_buffer"} and torch.equal(back, both.view(64, 65))
    lambdas = {}
    int8.store(lambdas, "exp_avg", int8.load(lambdas, "exp_avg", torch.ones(12)) + 1)  # below MIN_QUANTIZED_NUMEL: fp32
    assert set(lambdas) == {"exp_avg"} and torch.equal(lambdas["exp_avg"], torch.ones(12))


# ---------------------------------------------------------------------------------------------
# optimizer updates: bf16 weights against fp32 weights, 8-bit against fp32 states

def one_matrix(kind: str, dtype: torch.dtype, optim_state: str = "float32") -> tuple[torch.Tensor, torch.optim.Optimizer, object]:
    """(weight (128, 64), its optimizer, its MoleGrad layer or None), the same values for every dtype."""
    torch.manual_seed(0)
    layer = MoleGradLinear(64, 128, rank_k=32, seed=0) if kind.startswith("molegrad") else None
    weight = layer.weight if layer is not None else torch.nn.Parameter(torch.randn(128, 64) * 0.1)
    weight.data = weight.data.bfloat16().to(dtype)  # bf16-representable in both
    options = dict(weight_decay=0.1, optim_state=optim_state, seed=3)
    if kind == "adamw":
        return weight, AdamW([weight], lr=0.01, betas=(0.8, 0.95), eps=1e-10, **options), None
    molegrad = dict(molegrad=[layer], molegrad_momentum=kind.split("_")[1]) if layer is not None else {}
    return weight, Muon([weight], lr=0.02, momentum=0.95, ns_dtype=torch.float32, **molegrad, **options), layer


def set_gradient(weight: torch.Tensor, layer, generator: torch.Generator) -> None:
    """The same bf16-representable gradient, in weight's dtype (a MoleGrad layer: its factor (out, k))."""
    if layer is not None:
        layer.grad_factor = torch.randn(128, 32, generator=generator).bfloat16().float()
    else:
        weight.grad = torch.randn(weight.shape, generator=generator).bfloat16().to(weight.dtype)


@pytest.mark.parametrize("kind", ["adamw", "adamw_spans", "muon", "molegrad_lowrank", "molegrad_dense"])
def test_a_bf16_update_is_the_fp32_update_stochastically_rounded(kind, monkeypatch):
    """Three steps; before each, the fp32 weights take the bf16 ones' values: the bf16 step lands on
    one of the two bf16 neighbours of the fp32 step, exactly (AdamW's fp32 side is torch's own:
    the bf16 loop computes its arithmetic, op for op; adamw_spans: 8 spans per update), rounding
    both ways."""
    if kind == "adamw_spans":
        monkeypatch.setattr(precision, "SPAN", 1024)
        kind = "adamw"
    w16, opt16, layer16 = one_matrix(kind, torch.bfloat16)
    w32, opt32, layer32 = one_matrix(kind, torch.float32)
    if kind == "adamw":
        opt32 = torch.optim.AdamW([w32], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    directions = []
    for step in range(3):
        with torch.no_grad():
            w32.copy_(w16)
        for weight, opt, layer in ((w16, opt16, layer16), (w32, opt32, layer32)):
            set_gradient(weight, layer, torch.Generator().manual_seed(step))
            opt.step()
        toward, away = bf16_neighbours(w32.detach())
        rounded = w16.detach().float()
        assert ((rounded == toward) | (rounded == away)).all(), step
        directions += [(rounded == toward) & (toward != away), rounded == away]
    assert all(bool(d.any()) for d in directions)


def test_an_update_span_by_span_is_the_whole_update(monkeypatch):
    """AdamW with 8-bit states on fp32 weights: spans on block boundaries change no bit."""
    needs_extra("torchao", "lowmem")
    results = []
    for span in (precision.SPAN, 3 * QUANT_BLOCK):
        monkeypatch.setattr(precision, "SPAN", span)
        weight, opt, _ = one_matrix("adamw", torch.float32, "int8")
        for step in range(3):
            set_gradient(weight, None, torch.Generator().manual_seed(step))
            opt.step()
        results.append((weight.detach().clone(), opt.state_dict()["state"]))
    assert same_tensors(results[0], results[1])


@pytest.mark.parametrize("kind", ["adamw", "muon", "molegrad_lowrank"])
def test_8bit_states_step_close_to_fp32_states(kind):
    """Ten steps of correlated gradients on fp32 weights: with 8-bit states the total update is the
    fp32 states' one to within 5 x the map's widest half gap (0.7% of a block's absmax)."""
    needs_extra("torchao", "lowmem")
    runs = {}
    for optim_state in ("float32", "int8"):
        weight, opt, layer = one_matrix(kind, torch.float32, optim_state)
        start, generator = weight.detach().clone(), torch.Generator().manual_seed(0)
        mean = torch.randn(128, 32 if layer is not None else 64, generator=generator)
        for _ in range(10):
            set_gradient(weight, layer, generator)
            with torch.no_grad():
                (layer.grad_factor if layer is not None else weight.grad).add_(mean)
            opt.step()
        runs[optim_state] = weight.detach() - start
        codes = [v for v in opt.state[weight].values() if torch.is_tensor(v) and v.dtype == torch.uint8]
        assert len(codes) == (0 if optim_state == "float32" else 2 if kind == "adamw" else 1)
    qmap = OptimizerStates("int8").qmap(True, torch.device("cpu"))
    tolerance = 5 * (qmap[1:] - qmap[:-1]).max().item() / 2
    difference = (runs["int8"] - runs["float32"]).norm() / runs["float32"].norm()
    assert 0 < difference <= tolerance, (difference, tolerance)


# ---------------------------------------------------------------------------------------------
# flags and presets

def test_presets_set_precision_and_standard_has_no_molegrad():
    standard = MemoryFlags(memory_mode="standard")
    assert not standard.molegrad_on() and standard.memory_options()["molegrad_rank_k"] == 0
    assert standard.memory_options()["recompute"] == "block"
    assert standard.precision_options() == dict(param_dtype="bfloat16", grad_dtype="auto", optim_state="int8")
    for name in ("low", "lowest", "keep_h"):
        plain, precise = MemoryFlags(memory_mode=name), MemoryFlags(memory_mode=f"{name}_bf16")
        assert plain.memory_options() == precise.memory_options() and precise.molegrad_on()
        assert plain.precision_options() == MemoryFlags().precision_options() != precise.precision_options()
        assert precise.precision_options() == standard.precision_options()
    assert MemoryFlags().precision_options() == dict(param_dtype="float32", grad_dtype="auto", optim_state="float32")
    assert {"standard", "low_bf16", "bf16_weights", "int8_states"} <= set(MEMORY_SETTINGS) and "standard" in MEMORY_MODES
    options = TrainFlags(memory_mode="standard", seed=5).optimizer_options()  # what every stage gives setup_optimizers
    assert (options["param_dtype"], options["optim_state"], options["seed"]) == ("bfloat16", "int8", 5)


@pytest.mark.parametrize("argv,message", [
    (["--memory_mode=standard", "--molegrad=True"],
     "--molegrad=True: contradicts --memory_mode=standard, which sets molegrad=False"),
    (["--memory_mode=low_bf16", "--optim_state=float32"], None),  # the default never contradicts
    (["--memory_mode=standard", "--param_dtype=float32"], None),
    (["--grad_dtype=bfloat16"], "--grad_dtype=bfloat16: needs --param_dtype=bfloat16;"),
    (["--param_dtype=float16"], "--param_dtype: expected one of float32|bfloat16, got 'float16'"),
    (["--optim_state=int4"], "--optim_state: expected one of float32|int8, got 'int4'"),
])
def test_bad_precision_flags_are_one_line_naming_the_flag(argv, message):
    if message is None:
        parse_args_or_raise(MemoryFlags, argv)
        return
    with pytest.raises(ConfigError) as e:
        parse_args_or_raise(MemoryFlags, argv)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_help_names_each_option():
    text = format_help(MemoryFlags)
    for flag in ("--param_dtype", "--grad_dtype", "--optim_state", "standard = recompute=block", "pip install -e '.[lowmem]'"):
        assert flag in text


def test_a_missing_torchao_is_one_line_naming_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao raises ImportError; find_spec finds nothing
    monkeypatch.setitem(sys.modules, "torchao.optim", None)
    with pytest.raises(ConfigError, match=r"^--optim_state=int8: 8-bit optimizer states need torchao, the lowmem extra: "
                                          r"pip install -e '\.\[lowmem\]'$"):
        parse_args_or_raise(MemoryFlags, ["--memory_mode=standard"])
    with pytest.raises(UserError, match=f"^{MISSING_TORCHAO}$".replace("[", r"\[").replace(".", r"\.")):
        OptimizerStates("float32").quant_utils  # a float32 run reading 8-bit states
    with pytest.raises(SystemExit):
        base_train.main(TINY_BASE_TRAIN_ARGS + ["--num_iterations=1", "--optim_state=int8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --optim_state=int8: " + MISSING_TORCHAO], err


# ---------------------------------------------------------------------------------------------
# training steps

def tiny_gpt(**options) -> GPT:
    """CONFIG's GPT with bf16-representable weights (so that fp32 and bf16 start alike), the
    zero-initialised output projections perturbed so that every matrix moves in the first step."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG, **options))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02).copy_(p.bfloat16())
    return model


def batches(steps: int, seed: int = 1) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """`steps` lists of two micro-batches of 2 rows."""
    generator = torch.Generator().manual_seed(seed)
    tokens = [torch.randint(0, CONFIG["vocab_size"], (4, 17), generator=generator) for _ in range(steps)]
    return [[(t[:2, :-1], t[:2, 1:]), (t[2:, :-1], t[2:, 1:])] for t in tokens]


def optimizers_of(model: GPT, **precision) -> list[torch.optim.Optimizer]:
    optimizers = setup_optimizers(model, weight_decay=0.1, seed=3, **precision)
    for opt in optimizers:
        if isinstance(opt, Muon):
            opt.ns_dtype = torch.float32  # the same Newton–Schulz on both sides
    return optimizers


def test_a_bf16_step_follows_the_fp32_step():
    """From the same (bf16-representable) weights, one step with bf16 weights, fp32 gradient sums and
    stochastic rounding against the fp32 step: the loss agrees to bf16's 8 significant bits, and every
    matrix's update to within 2^-3 of its norm (bf16 forward and backward perturb the gradient,
    Newton–Schulz normalises each update, so the weakest directions differ most; the rounding
    adds at most one bf16 gap per weight, bounded separately)."""
    (batch,) = batches(1)
    runs = {}
    for name, options in (("fp32", {}), ("bf16", dict(param_dtype="bfloat16", grad_dtype="float32"))):
        model = tiny_gpt()
        start = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        loss, _ = train_step(model, optimizers_of(model, **options), iter(batch), 2, CPU)
        runs[name] = loss, {n: p.detach().float() - start[n] for n, p in model.named_parameters()}, start, model
    (loss32, step32, start, _), (loss16, step16, _, model16) = runs["fp32"], runs["bf16"]
    assert {p.dtype for p in model16.parameters()} == {torch.bfloat16}
    assert loss16 == pytest.approx(loss32, rel=2 ** -8)
    for name, update in step32.items():
        gaps = BF16_EPS * (start[name] + update).abs()  # at most the bf16 gap at the new weight
        assert update.norm() > 0 and (step16[name] - update).norm() <= 2 ** -3 * update.norm() + gaps.norm(), name


def test_fp32_gradient_sums_are_the_sum_of_bf16_micro_batch_gradients():
    model = tiny_gpt()
    prepare_parameters(model, "bfloat16", "float32")
    expected = {}
    for inputs, targets in batches(1)[0]:
        reference = tiny_gpt()
        prepare_parameters(reference, "bfloat16")  # gradients in bf16, one micro-batch each
        (reference(inputs, targets) / 2).backward()
        for name, p in reference.named_parameters():
            expected[name] = expected.get(name, 0) + p.grad.float()
        (model(inputs, targets) / 2).backward()
    for name, p in model.named_parameters():
        assert p.grad is None and gradient(p).dtype == torch.float32
        torch.testing.assert_close(gradient(p), expected[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("memory", [dict(molegrad_rank_k=8, molegrad_momentum="lowrank", recompute="block"),
                                    dict(molegrad_rank_k=8, molegrad_momentum="dense", layer_lambdas=True,
                                         smear_gate=True, backout=True, value_embeds=True)])
def test_resume_with_every_option_is_bit_exact(memory):
    """Four steps straight against two, a save (torch.save, read back with weights_only=True) and
    two more in a fresh model and fresh optimizers: every weight, buffer and state equal bit for bit."""
    needs_extra("torchao", "lowmem")
    steps = batches(4)

    def fresh() -> tuple[GPT, list[torch.optim.Optimizer]]:
        model = tiny_gpt(**memory)
        return model, optimizers_of(model, **EVERY_OPTION)

    straight, straight_opts = fresh()
    losses = [train_step(straight, straight_opts, iter(b), 2, CPU)[0] for b in steps]
    first, first_opts = fresh()
    for b in steps[:2]:
        train_step(first, first_opts, iter(b), 2, CPU)
    saved = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizers": [opt.state_dict() for opt in first_opts]}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)
    resumed, resumed_opts = fresh()
    resumed.load_state_dict(checkpoint["model"])
    for opt, state in zip(resumed_opts, checkpoint["optimizers"]):
        opt.load_state_dict(state)
    resumed_losses = [train_step(resumed, resumed_opts, iter(b), 2, CPU)[0] for b in steps[2:]]
    assert resumed_losses == losses[2:]
    assert same_tensors(resumed.state_dict(), straight.state_dict())
    assert same_tensors([opt.state_dict() for opt in resumed_opts], [opt.state_dict() for opt in straight_opts])
    muon_state = straight_opts[1].state_dict()["state"]
    assert any(v.dtype == torch.uint8 for s in muon_state.values() for v in s.values() if torch.is_tensor(v))
    assert {p.dtype for p in straight.parameters()} == {torch.bfloat16}


def test_base_train_resumes_the_practitioner_stack_exactly(base_dir):
    needs_extra("torchao", "lowmem")
    run = TINY_BASE_TRAIN_ARGS + ["--num_iterations=4", "--eval_every=-1", "--save_every=2", "--keep_checkpoints=0",
                                  "--memory_mode=standard", "--grad_dtype=float32"]
    full = base_train.main(run + ["--model_tag=std_full"])
    base_train.main(run + ["--model_tag=std_resumed"])
    resumed = base_train.main(run + ["--model_tag=std_resumed", "--resume_from_step=2"])
    assert resumed["losses"] == full["losses"][2:]
    weights = torch.load(Path(full["checkpoint_dir"]) / "model_000004.pt", weights_only=True)
    assert weights["lm_head.weight"].dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# two processes

def _train_ranks(rank: int, world_size: int, work_dir: str) -> None:
    """Three steps with every option on, unclipped (a norm summed in another order would scale the
    gradients apart): one process takes both micro-batches of each step, each of two ranks one;
    the model's state dict to work_dir."""
    torch.set_num_threads(1)
    if world_size > 1:
        distributed.init_process_group("gloo", init_method=f"file://{work_dir}/store", rank=rank, world_size=world_size)
    ctx = RunContext(torch.device("cpu"), "cpu", torch.float32, world_size > 1, rank, rank, world_size)
    try:
        model = tiny_gpt(molegrad_rank_k=8, molegrad_momentum="lowrank", value_embeds=True)
        optimizers = optimizers_of(model, **EVERY_OPTION)
        for step in batches(3):
            mine = step if world_size == 1 else step[rank:rank + 1]
            train_step(model, optimizers, iter(mine), len(mine), ctx, grad_clip=0.0)
        torch.save(model.state_dict(), Path(work_dir) / f"w{world_size}_r{rank}.pt")
        if world_size > 1:
            dist.barrier()
    finally:
        if world_size > 1:
            dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_gloo_ranks_agree_bitwise_and_follow_one_process(monkeypatch):
    """Sharded AdamW and Muon with bf16 weights, fp32 gradient sums and 8-bit states: two ranks with
    one micro-batch each end bit for bit where one process with both micro-batches ends (the
    average of two gradients is their halves' sum, exactly; the rounding bits do not depend on which
    rank updates what), weights, MoleGrad's subspaces and replicated matrices included."""
    needs_extra("torchao", "lowmem")
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "60")
    with tempfile.TemporaryDirectory() as work_dir:
        _train_ranks(0, 1, work_dir)
        mp.spawn(_train_ranks, args=(2, work_dir), nprocs=2, join=True)
        single, rank0, rank1 = (torch.load(Path(work_dir) / name, weights_only=True) for name in ("w1_r0.pt", "w2_r0.pt", "w2_r1.pt"))
    assert same_tensors(rank0, rank1) and same_tensors(rank0, single)
    assert single["lm_head.weight"].dtype == torch.bfloat16 and any(name.endswith(".Q") for name in single)


# ---------------------------------------------------------------------------------------------
# the compute dtype of bf16 weights

@pytest.mark.parametrize("options", [{}, dict(molegrad_rank_k=8, recompute="block", layer_lambdas=True, smear_gate=True,
                                              backout=True, value_embeds=True)], ids=["dense", "molegrad_block_recipe"])
def test_bf16_weights_compute_as_their_fp32_values_on_a_cpu(options):
    """Without autocast a CPU computes bf16 weights in fp32 (GPT.stream_dtype; bf16 matmuls are
    emulated on most CPUs): the loss and the logits are those of fp32 weights of the same values,
    bit for bit, and every gradient is the fp32 one rounded to bf16; the embeddings' within bf16's
    precision in norm, since a token's rows are summed after the rounding. On CUDA bf16 weights compute in bf16."""
    (batch,) = batches(1)
    inputs, targets = batch[0]
    fp32 = tiny_gpt(**options)
    bf16 = tiny_gpt(**options)
    prepare_parameters(bf16, "bfloat16")
    assert bf16.stream_dtype("cpu") == torch.float32 and bf16.stream_dtype("cuda") == torch.bfloat16
    # with gradients on in both: matmul picks its kernel by requires_grad (the smear gate's 3-D input)
    losses = [model(inputs, targets) for model in (fp32, bf16)]
    logits = [model(inputs) for model in (fp32, bf16)]
    assert torch.equal(*losses) and torch.equal(*logits) and logits[1].dtype == torch.float32
    for loss in losses:
        loss.backward()
    embeddings = {name for name, module in fp32.named_modules() if isinstance(module, torch.nn.Embedding)}
    for (name, p32), p16 in zip(fp32.named_parameters(), bf16.parameters()):
        assert p16.dtype == torch.bfloat16 and (p16.grad is None) == (p32.grad is None), name
        if p32.grad is None:  # a MoleGrad weight: its factor gradient is compared below
            continue
        if name.rsplit(".", 1)[0] in embeddings:
            assert (p16.grad.float() - p32.grad).norm() <= BF16_EPS * p32.grad.norm(), name
        else:
            assert torch.equal(p16.grad, p32.grad.bfloat16()), name
    sinks = [(a.grad_sink.grad, b.grad_sink.grad) for a, b in zip(fp32.modules(), bf16.modules()) if isinstance(a, MoleGradLinear)]
    assert len(sinks) == (2 * CONFIG["n_layer"] if options else 0)
    assert all(torch.equal(a, b) for a, b in sinks)
