"""MoleGrad in the model and the training step: wiring, exactness at full rank, saved bytes,
accumulation, several processes, the optimizer's low-rank momentum, resume, flags, learning.

Numerics in float64 with Newton–Schulz in float64, so that "equal" means equal to rounding."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from nanochat.checkpoint import load_model_state_strict
from nanochat.common import RunContext
from nanochat.gpt import GPT, GPTConfig
from nanochat.model_flags import MEMORY_MODES, MOLEGRAD_PRESETS
from nanochat.memory_measure import measure_block_saved_bytes
from nanochat.molegrad import MoleGradStep
from nanochat.optim import Muon, setup_optimizers, zeropower_via_newtonschulz5
from nanochat.molegrad import MOLEGRAD_TARGET_LINEARS, MoleGradLinear, molegrad_layers
from nanochat.trainer import train_step
from scripts import base_train
from tests.helpers import TINY_BASE_TRAIN_ARGS, assert_trains_like_dense, dense_grad, train_in_two_gloo_processes

torch.set_num_threads(1)

VOCAB = 97
CPU = RunContext(torch.device("cpu"), "cpu", torch.float32, False, 0, 0, 1)  # float32 = no autocast


def tiny_gpt(rank_k: int = 0, targets: str = "all", momentum: str = "dense", **overrides) -> GPT:
    """Two blocks, width 32, in float64, every matrix perturbed so that every path carries signal."""
    fields = dict(sequence_len=16, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                  molegrad_rank_k=rank_k, molegrad_targets=targets, molegrad_momentum=momentum)
    fields.update(overrides)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**fields)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    for layer in molegrad_layers(model):
        layer.reset_subspace()  # Q orthonormal to float64 precision, not float32's
    return model


OPTIMIZER = dict(unembedding_lr=0.01, embedding_lr=0.1, matrix_lr=0.05, weight_decay=0.1)


def optimizers_of(model: GPT) -> list[torch.optim.Optimizer]:
    optimizers = setup_optimizers(model, **OPTIMIZER)
    optimizers[1].ns_dtype = torch.float64
    return optimizers


def batches(steps: int, batch: int = 4, length: int = 16, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (steps, batch, length + 1), generator=generator)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def full_rank(model: GPT) -> None:
    """Every MoleGradLinear becomes one of rank k = in_features with Q = I: MoleGrad keeps all of x."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, MoleGradLinear):
                full = MoleGradLinear(child.in_features, child.out_features, rank_k=child.in_features,
                                       seed=child.seed).double()
                with torch.no_grad():
                    full.weight.copy_(child.weight)
                    full.Q.copy_(torch.eye(child.in_features))
                setattr(module, name, full)


# ---------------------------------------------------------------------------------------------
# wiring

@pytest.mark.parametrize("targets", list(MOLEGRAD_TARGET_LINEARS))
def test_targets_choose_the_molegrad_linears(targets):
    model = tiny_gpt(rank_k=8, targets=targets, molegrad_power_iters=2, molegrad_warm_start_decay=0.9)
    compressed = {name for name, m in model.named_modules() if isinstance(m, MoleGradLinear)}
    expected = {f"transformer.h.{i}.{linear}" for i in range(2) for linear in MOLEGRAD_TARGET_LINEARS[targets]}
    assert compressed == expected
    layers = molegrad_layers(model)
    assert all((m.rank_k, m.power_iters, m.warm_start_decay) == (8, 2, 0.9) for m in layers)
    assert len({m.seed for m in layers}) == len(layers)  # distinct subspaces
    assert all(m.weight.dtype == m.Q.dtype == torch.float64 for m in layers)
    assert not any(isinstance(m, MoleGradLinear) for m in tiny_gpt(rank_k=0).modules())


def test_init_like_dense_and_reset_subspaces():
    torch.manual_seed(0)
    dense = GPT(GPTConfig(sequence_len=16, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))
    torch.manual_seed(0)
    compressed = GPT(GPTConfig(sequence_len=16, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                              molegrad_rank_k=4, molegrad_targets="all"))
    for (name, p), q in zip(dense.named_parameters(), compressed.parameters()):
        assert torch.equal(p, q), name
    start = [m.Q.clone() for m in molegrad_layers(compressed)]
    optimizers = setup_optimizers(compressed)
    train_step(compressed, optimizers, iter(batches(1)), 1, CPU)
    assert all(m.num_updates == 1 and not torch.equal(m.Q, q) for m, q in zip(molegrad_layers(compressed), start))
    compressed.init_weights()
    assert all(m.num_updates == 0 and torch.equal(m.Q, q) for m, q in zip(molegrad_layers(compressed), start))


def test_state_dict_round_trip_and_low_precision_cast():
    model = tiny_gpt(rank_k=4)
    optimizers = optimizers_of(model)
    for batch in batches(2):
        train_step(model, optimizers, iter([batch]), 1, CPU)
    state = model.state_dict()
    assert all(torch.is_tensor(v) for v in state.values())
    fresh = tiny_gpt(rank_k=4)
    load_model_state_strict(fresh, state, "test")
    for a, b in zip(molegrad_layers(model), molegrad_layers(fresh)):
        assert (b.num_updates, b.seed) == (a.num_updates, a.seed) == (2, a.seed)
        assert torch.equal(a.Q, b.Q) and torch.equal(a.sketch, b.sketch)
    fresh.to(torch.bfloat16)  # as an inference engine might: only the weights are cast
    for layer in molegrad_layers(fresh):
        assert layer.weight.dtype == torch.bfloat16
        assert {layer.Q.dtype, layer.scouts.dtype, layer.sketch.dtype, layer.input_energy.dtype} == {torch.float64}
    with torch.no_grad():
        assert fresh(batches(1)[0][0]).isfinite().all()


def test_rank_larger_than_a_targeted_width_is_rejected():
    with pytest.raises(ValueError, match=r"^molegrad_rank_k=33: expected 1 <= molegrad_rank_k <= in_features=32"):
        tiny_gpt(rank_k=33, targets="attn_only")
    assert tiny_gpt(rank_k=32, targets="ffn_only").transformer.h[0].mlp.c_proj.rank_k == 32


@pytest.mark.parametrize("recompute", ["mlp", "block"])
def test_recompute_with_molegrad_gives_the_same_step(recompute):
    plain, recomputed = tiny_gpt(rank_k=4), tiny_gpt(rank_k=4, recompute=recompute)
    for model in (plain, recomputed):
        optimizers = optimizers_of(model)
        for batch in batches(2):
            train_step(model, optimizers, iter([batch]), 1, CPU, 1.0, 0.9, 1.0)
    for (name, a), b in zip(plain.state_dict().items(), recomputed.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=0, msg=name)


# ---------------------------------------------------------------------------------------------
# exactness: at k = in (Q orthogonal and square) MoleGrad is dense training

@pytest.mark.parametrize("momentum", ["dense", "lowrank"])
@pytest.mark.parametrize("targets", list(MOLEGRAD_TARGET_LINEARS))
def test_full_rank_training_steps_equal_dense(targets, momentum):
    """Three optimizer steps with clipping, weight decay and subspace updates (Q rotates but stays
    square): losses, gradient norms and every weight equal dense training's."""
    dense = tiny_gpt(rank_k=0)
    compressed = tiny_gpt(rank_k=4, targets=targets, momentum=momentum)
    full_rank(compressed)
    load_model_state_strict(dense, {k: v for k, v in compressed.state_dict().items() if k in dense.state_dict()}, "dense")
    assert_trains_like_dense(dense, compressed, optimizers_of, batches(3))


# ---------------------------------------------------------------------------------------------
# memory: bytes saved for backward per token

def per_token(d: int, part: str, autocast: bool, **config) -> tuple[float, list[tuple[int, ...]]]:
    """Saved bytes per token of one block (or its MLP), fp32 model, and the saved shapes."""
    config = GPTConfig(sequence_len=128, vocab_size=VOCAB, n_layer=1, n_head=d // 64, n_kv_head=d // 64, n_embd=d, **config)
    saved = measure_block_saved_bytes(config, "bfloat16" if autocast else "float32", part=part)
    return saved.per_token, saved.shapes


@pytest.mark.parametrize("autocast", [False, True])
def test_saved_bytes_per_token(autocast):
    d, k, item = 256, 32, 2 if autocast else 4
    arms = {
        "dense": {},
        "recompute=mlp": dict(recompute="mlp"),
        "recompute=block": dict(recompute="block"),
        "MoleGrad ffn_only k=32": dict(molegrad_rank_k=k, molegrad_targets="ffn_only"),
        "MoleGrad attn_only k=32": dict(molegrad_rank_k=k, molegrad_targets="attn_only"),
        "MoleGrad all k=32": dict(molegrad_rank_k=k, molegrad_targets="all"),
    }
    measured = {name: per_token(d, "block", autocast, **config) for name, config in arms.items()}
    print(f"\nbytes saved for backward per token, one block, d={d}, {'bf16 autocast' if autocast else 'fp32'}")
    for name, (size, _) in measured.items():
        print(f"  {name:24s} {size:8.0f} B  {size / (d * item):6.2f} d")
    dense = measured["dense"][0]
    # the MLP stops keeping h (4d) and keeps x Q1 and relu²(h) Q2 (2k): no (N, 4d) tensor is saved
    assert measured["MoleGrad ffn_only k=32"][0] == dense - (4 * d - 2 * k) * item
    assert measured["MoleGrad all k=32"][0] == dense - (4 * d - 2 * k) * item + 4 * k * item
    for name in ("MoleGrad ffn_only k=32", "MoleGrad all k=32"):
        assert not any(shape[-1] == 4 * d for shape in measured[name][1]), name
    # attention Linears' inputs are kept by their RMSNorm (x) and SDPA (q, k, v, out) anyway:
    # MoleGrad adds its x Q (k per Linear) and keeps nothing else
    assert measured["MoleGrad attn_only k=32"][0] == dense + 4 * k * item
    # the MLP alone: its normed input (d, which its norm keeps), 2k, and the norm's fp32 row scale
    mlp, shapes = per_token(d, "mlp", autocast, molegrad_rank_k=k, molegrad_targets="ffn_only")
    assert mlp == (d + 2 * k) * item + 4
    assert not any(shape[-1] == 4 * d for shape in shapes)


# ---------------------------------------------------------------------------------------------
# accumulation and several processes

@pytest.mark.parametrize("momentum", ["dense", "lowrank"])
def test_micro_batches_equal_one_big_batch(momentum):
    big, small = tiny_gpt(rank_k=4, momentum=momentum), tiny_gpt(rank_k=4, momentum=momentum)
    big_opt, small_opt = optimizers_of(big), optimizers_of(small)
    for inputs, targets in batches(3, batch=4):
        halves = [(inputs[:2], targets[:2]), (inputs[2:], targets[2:])]
        loss_small, norm_small = train_step(small, small_opt, iter(halves), 2, CPU, 1.0, 0.9, 1.0)
        loss_big, norm_big = train_step(big, big_opt, iter([(inputs, targets)]), 1, CPU, 1.0, 0.9, 1.0)
        assert loss_small == pytest.approx(loss_big, abs=1e-12) and norm_small == pytest.approx(norm_big, abs=1e-10)
    for (name, a), b in zip(big.state_dict().items(), small.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=0, msg=name)


@pytest.mark.multiprocess
def test_two_processes_equal_one_and_communicate_only_factors(tmp_path):
    """Each of two gloo processes takes half of every batch: the same model as one process."""
    single = tiny_gpt(rank_k=4, momentum="lowrank")
    states, reduced = train_in_two_gloo_processes(single, batches(2), OPTIMIZER, tmp_path)
    optimizers = optimizers_of(single)
    for batch in batches(2):
        train_step(single, optimizers, iter([batch]), 1, CPU, 1.0, 0.9, 1.0)
    for state in states:
        for name, value in single.state_dict().items():
            torch.testing.assert_close(state[name], value, atol=1e-10, rtol=0, msg=name)
    weights = {tuple(m.weight.shape) for m in molegrad_layers(single)}
    factors = {(m.out_features, m.rank_k) for m in molegrad_layers(single)}
    # sketch (in, k+e), energy and tokens (1,); () is the loss and the clipping norm
    statistics = {(m.in_features, m.rank_k + m.explore_k) for m in molegrad_layers(single)} | {(1,), ()}
    dense = {tuple(single.transformer.wte.weight.shape)}
    assert reduced == factors | statistics | dense and not reduced & weights


# ---------------------------------------------------------------------------------------------
# the optimizer against slow references, with a rotating subspace

@pytest.mark.parametrize("momentum, rule", [("dense", "unit"), ("lowrank", "unit"), ("lowrank", "dense_norm")])
def test_muon_on_factors_matches_dense_reference(momentum, rule):
    """dense: plain Muon fed the dense gradient gq Qᵀ. lowrank: dense Muon on the momentum's image,
    which after each rotation of Q is the old image projected onto the new subspace, its step
    times the rule's r (unit: 1; dense_norm: √(min(12, 16) / min(12, 4)) = √3)."""
    torch.manual_seed(0)
    layer = MoleGradLinear(16, 12, rank_k=4, seed=3).double()
    layer.reset_subspace()  # Q orthonormal to float64 precision, not float32's
    mu, lr, wd = 0.9, 0.1, 0.1
    r = 3 ** 0.5 if rule == "dense_norm" else 1.0
    opt = Muon([layer.weight], lr=lr, momentum=mu, weight_decay=wd, ns_dtype=torch.float64,
               molegrad=[layer], molegrad_momentum=momentum, lowrank_step_rule=rule)
    reference = torch.nn.Parameter(layer.weight.detach().clone())
    reference_opt = Muon([reference], lr=lr, momentum=mu, weight_decay=wd, ns_dtype=torch.float64)
    image = torch.zeros(12, 16, dtype=torch.float64)  # the low-rank momentum's dense image m Qᵀ
    for step in range(4):
        x = torch.randn(32, 16, dtype=torch.float64) @ torch.diag(torch.linspace(1, 0.1, 16, dtype=torch.float64))
        layer(x).square().sum().backward()
        grad = dense_grad(layer)  # (12, 16), for the references only
        if momentum == "dense":
            reference.grad = grad
            reference_opt.step()
        else:
            image = mu * image + (1 - mu) * grad
            update = (1 - mu) * grad + mu * image  # Nesterov
            with torch.no_grad():
                reference.mul_(1 - lr * wd).add_(zeropower_via_newtonschulz5(update, dtype=torch.float64), alpha=-lr * r)
        opt.step()
        torch.testing.assert_close(layer.weight.detach(), reference.detach(), atol=1e-10, rtol=0)
        q_old = layer.Q.clone()
        MoleGradStep(layer).finish([opt])
        assert (layer.Q - q_old).abs().max() > 0.01  # Q really rotates
        if momentum == "lowrank":
            image = image @ layer.Q @ layer.Q.T  # projection of the old image onto the new subspace
            factor = opt.state[layer.weight]["momentum_factor"]  # (12, 4)
            assert factor.shape == (12, 4) and "momentum_buffer" not in opt.state[layer.weight]
            torch.testing.assert_close(factor @ layer.Q.T, image, atol=1e-12, rtol=0)


def lowrank_and_dense_steps(out_features: int, in_features: int, rule: str, lr: float = 0.1) -> dict[str, torch.Tensor]:
    """W's change under one low-rank Muon step (rank-8 factor) and one dense Muon step on the
    full-rank gradient of the same batch, from the same W."""
    torch.manual_seed(0)
    layer = MoleGradLinear(in_features, out_features, rank_k=8, seed=1).double()
    layer.reset_subspace()
    dense = torch.nn.Parameter(layer.weight.detach().clone())
    x = torch.randn(256, in_features, dtype=torch.float64)
    layer(x).square().sum().backward()
    torch.nn.functional.linear(x, dense).square().sum().backward()
    steps = {}
    for name, param, opt in (
            ("lowrank", layer.weight, Muon([layer.weight], lr=lr, momentum=0.0, ns_dtype=torch.float64,
                                           molegrad=[layer], molegrad_momentum="lowrank", lowrank_step_rule=rule)),
            ("dense", dense, Muon([dense], lr=lr, momentum=0.0, ns_dtype=torch.float64))):
        start = param.detach().clone()
        opt.step()
        steps[name] = param.detach() - start
    return steps


@pytest.mark.parametrize("out_features, in_features", [(48, 48), (192, 48), (48, 192)])
def test_lowrank_step_length_under_each_rule(out_features, in_features):
    """dense_norm: at equal lr the low-rank step has about the dense step's Frobenius norm
    (unscaled it would be ≈ √(8 / min(out, in)) = 0.41 of it). unit: about the dense
    step's spectral norm, i.e. the same largest per-direction move."""
    steps = lowrank_and_dense_steps(out_features, in_features, "dense_norm")
    # Newton–Schulz leaves singular values in ~[0.7, 1.2], not at 1: "about" is ±25%
    assert steps["lowrank"].norm() / steps["dense"].norm() == pytest.approx(1.0, abs=0.25)
    steps = lowrank_and_dense_steps(out_features, in_features, "unit")
    spectral = {name: torch.linalg.matrix_norm(step, ord=2).item() for name, step in steps.items()}
    assert spectral["lowrank"] / spectral["dense"] == pytest.approx(1.0, abs=0.25), spectral
    assert steps["lowrank"].norm() / steps["dense"].norm() == pytest.approx((8 / min(out_features, in_features)) ** 0.5, rel=0.25)


def test_the_dense_norm_rule_at_lr_is_the_unit_rule_at_lr_times_r():
    """What lets bench/molegrad_quality.py report its low-rank arms (run under dense_norm) as
    unit-rule LRs: without weight decay the two rules differ only by the factor r on lr."""
    r = (min(48, 192) / min(48, 8)) ** 0.5
    norm_rule = lowrank_and_dense_steps(48, 192, "dense_norm", lr=0.01)["lowrank"]
    unit_rule = lowrank_and_dense_steps(48, 192, "unit", lr=0.01 * r)["lowrank"]
    torch.testing.assert_close(unit_rule, norm_rule, atol=1e-14, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# the named memory modes and torch.compile

def mode_gpt(mode: str, rank_k: int = 4, **overrides) -> GPT:
    """tiny_gpt in a MEMORY_MODES preset."""
    return tiny_gpt(rank_k=rank_k, **overrides, **{"targets": MEMORY_MODES[mode]["molegrad_targets"],
                                      "momentum": MEMORY_MODES[mode]["molegrad_momentum"],
                                      **{k: v for k, v in MEMORY_MODES[mode].items()
                                         if k not in ("molegrad_targets", "molegrad_momentum")}})


def compiled(model: GPT) -> torch.nn.Module:
    torch._dynamo.reset()
    counters.clear()
    return torch.compile(model, backend="aot_eager")


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])  # compiled: ~15 s each
@pytest.mark.parametrize("mode", list(MOLEGRAD_PRESETS))
def test_memory_modes_at_full_rank_equal_dense(mode, compile):
    """lowest (block recompute, h kept inside it, low-rank momentum) and keep_h at k = in: three
    steps equal dense training (eager) to float64 rounding, also when compiled (aot_eager)."""
    dense = tiny_gpt(rank_k=0)
    compressed = mode_gpt(mode)
    full_rank(compressed)
    load_model_state_strict(dense, {k: v for k, v in compressed.state_dict().items() if k in dense.state_dict()}, "dense")
    runs = {}
    for name, model in (("dense", dense), ("molegrad", compressed)):
        optimizers = optimizers_of(model)
        runner = compiled(model) if compile and name == "molegrad" else model
        runs[name] = [train_step(runner, optimizers, iter([batch]), 1, CPU, 1.0, 0.9, 0.5) for batch in batches(3)]
    for (loss_d, norm_d), (loss_s, norm_s) in zip(runs["dense"], runs["molegrad"]):
        assert loss_s == pytest.approx(loss_d, abs=1e-12) and norm_s == pytest.approx(norm_d, abs=1e-10)
    assert all(m.num_updates == 3 and m.tokens_step.item() == 0 for m in molegrad_layers(compressed))
    for name, p in dense.named_parameters():
        torch.testing.assert_close(compressed.get_parameter(name), p, atol=1e-10, rtol=0, msg=name)


@pytest.mark.parametrize("mode", ["default", *MOLEGRAD_PRESETS])
def test_ten_compiled_steps_compile_once_and_match_eager(mode):
    """MoleGrad at k < in with subspace updates every step: one graph, no recompile (Q's version is
    no Python int in the graph), and the weights, subspaces and sketches of eager training."""
    eager, twin = (tiny_gpt(rank_k=4, targets="ffn_only", n_layer=1) if mode == "default" else mode_gpt(mode, n_layer=1)
                   for _ in range(2))
    model = compiled(twin)
    for runner, target in ((eager, eager), (model, twin)):
        optimizers = optimizers_of(target)
        for batch in batches(10):
            train_step(runner, optimizers, iter([batch]), 1, CPU, 1.0, 0.9, 1.0)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"], dict(counters)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert all(m.num_updates == 10 for m in molegrad_layers(twin))
    for (name, a), b in zip(eager.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=0, msg=name)


class TensorLog(TorchDispatchMode):
    """Weak references to every tensor an op returns, and the matmuls' operand shapes."""

    def __init__(self):
        super().__init__()
        self.outputs: list[weakref.ref] = []
        self.matmuls: list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = []  # a, b shapes, b's strides

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            a, b = args[-2:] if func is torch.ops.aten.addmm.default else args
            self.matmuls.append((tuple(a.shape), tuple(b.shape), b.stride()))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.outputs.append(weakref.ref(t))
        return out

    def alive(self) -> list[torch.Tensor]:
        return [t for t in (ref() for ref in self.outputs) if t is not None]


@pytest.mark.parametrize("mode", ["lowest", "all, no recompute"])
def test_lowest_mode_keeps_no_layer_input_no_weight_copy_and_computes_h_once(mode):
    """bf16 autocast, 2 blocks, N = 3 x 16 tokens, d = 32. After forward, alive: no (N, 4d) tensor
    (h, relu²(h)), no bf16 (N, d) tensor but the final norm's output and d loss / d hidden, no bf16
    copy of a block weight (the autocast cache is not used); backward computes h = x W1ᵀ once per
    block (the recompute) and never again. The same checks fail for MoleGrad without recompute."""
    torch.manual_seed(0)
    options = MEMORY_MODES["lowest"] if mode == "lowest" else dict(molegrad_targets="all", molegrad_momentum="lowrank")
    model = GPT(GPTConfig(sequence_len=16, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                          molegrad_rank_k=4, **options))
    N, d = 3 * 16, 32
    weight_shapes = {tuple(p.shape) for p in model.transformer.h.parameters()}
    tokens = torch.randint(0, VOCAB, (3, 17))
    log = TensorLog()
    with torch.autocast("cpu", dtype=torch.bfloat16), log:
        loss = model(tokens[:, :-1], tokens[:, 1:])
        alive = log.alive()
        forward_matmuls = len(log.matmuls)
        loss.backward()
    wide = [tuple(t.shape) for t in alive if t.dim() == 2 and t.shape == (N, 4 * d)]
    narrow_bf16 = {t.untyped_storage().data_ptr() for t in alive
                   if t.dtype == torch.bfloat16 and t.shape[-1] == d and t.numel() == N * d}  # by storage
    weight_copies = [tuple(t.shape) for t in alive if t.dtype == torch.bfloat16 and tuple(t.shape) in weight_shapes]
    # h = x W1ᵀ: W1 (4d, d) enters transposed; g W2 (the same shapes) has W2 (d, 4d) as it is
    h_in_backward = [m for m in log.matmuls[forward_matmuls:] if m == ((N, d), (d, 4 * d), (1, d))]
    checks = (not wide, len(narrow_bf16) <= 2, not weight_copies, len(h_in_backward) == model.config.n_layer)
    if mode == "lowest":
        assert checks == (True, True, True, True), (wide, len(narrow_bf16), weight_copies, len(h_in_backward))
    else:  # the h that the compressed MLP recomputes, its inputs kept: what the lowest mode removes
        assert checks[1] is False and len(h_in_backward) == model.config.n_layer
    assert all(m.tokens_step.item() == N for m in molegrad_layers(model))  # statistics taken once


# ---------------------------------------------------------------------------------------------
# the script: resume, flags, learning

MOLEGRAD = TINY_BASE_TRAIN_ARGS + ["--molegrad=True", "--molegrad_rank_k=8", "--molegrad_targets=all"]


@pytest.mark.parametrize("momentum", ["dense", "lowrank"])
def test_resume_with_molegrad_is_bit_exact(base_dir, momentum):
    argv = MOLEGRAD + [f"--molegrad_momentum={momentum}", "--num_iterations=6", "--eval_every=-1", "--save_every=3",
                       "--keep_checkpoints=0"]
    full = base_train.main(argv + [f"--model_tag=full_{momentum}"])
    base_train.main(argv + [f"--model_tag=resumed_{momentum}"])
    resumed = base_train.main(argv + [f"--model_tag=resumed_{momentum}", "--resume_from_step=3"])
    assert resumed["losses"] == full["losses"][3:]  # floats compared exactly


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--molegrad_rank_k=0"], "--molegrad_rank_k=0: expected 1 <= molegrad_rank_k"),
        (["--molegrad=True", "--molegrad_rank_k=65"], "--molegrad_rank_k=65: expected 1 <= molegrad_rank_k <= "
                                                      "in_features=64, the input width"),
        (["--enable_streaming=True", "--streaming_rank_k=65"], "--molegrad_rank_k=65: expected"),  # the seed's names
        (["--molegrad_targets=bogus"], "--molegrad_targets: expected one of ffn_only|attn_only|all"),
        (["--molegrad_warm_start_decay=1.5"], "--molegrad_warm_start_decay=1.5: expected a value in [0, 1)"),
        (["--molegrad_power_iters=0"], "--molegrad_power_iters=0: expected >= 1"),
        (["--molegrad_momentum=heavy"], "--molegrad_momentum: expected one of dense|lowrank"),
        (["--molegrad_momentum=lowrank"], "--molegrad_momentum=lowrank: low-rank momentum needs MoleGrad"),
        (["--molegrad_keep_h=True"], "--molegrad_keep_h=True: needs MoleGrad on the MLP"),
        (["--memory_mode=lowest", "--recompute=mlp"], "--recompute=mlp: contradicts --memory_mode=lowest, which sets recompute=block"),
        (["--memory_mode=keep_h", "--molegrad_targets=ffn_only"], None),
        (["--memory_mode=fast"], "--memory_mode: expected one of custom|low|lowest|keep_h"),
    ],
)
def test_bad_molegrad_flags_fail_in_one_line(base_dir, capsys, argv, message):
    if message is None:  # ffn_only is the flag's default: a default never contradicts a mode
        assert base_train.main(TINY_BASE_TRAIN_ARGS + ["--num_iterations=1"] + argv) is not None
        return
    with pytest.raises(SystemExit) as e:
        base_train.main(TINY_BASE_TRAIN_ARGS + ["--num_iterations=2"] + argv)
    assert e.value.code in (1, 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_training_with_small_rank_lowers_val_bpb(base_dir):
    out = base_train.main(MOLEGRAD + ["--molegrad_rank_k=4", "--num_iterations=30", "--eval_every=30",
                                      "--model_tag=learn_molegrad", "--matrix_lr=0.05"])
    first, last = out["history"][0]["val_bpb"], out["history"][-1]["val_bpb"]
    assert last < 0.8 * first, (first, last)
