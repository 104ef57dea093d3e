"""MoleGrad's subspace variants and the ffn_v target set (issue 26's arms): each equals dense training
at k = in, the unbiased variant's expected projection is the identity, the gradient variant's probes
are dWᵀ R and find a gradient-heavy direction that the inputs' variance hides, and with each one on
resume is bit-exact and two gloo processes equal one. Numerics in float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import RunContext
from nanochat.gpt import GPT, GPTConfig
from nanochat.molegrad import MoleGradLinear, molegrad_layers, molegrad_mlp, move_subspaces, orthonormalize, redraw
from nanochat.optim import setup_optimizers
from nanochat.trainer import train_step
from tests.helpers import assert_trains_like_dense, dense_grad, random_tokens, tiny_model, train_in_two_gloo_processes

torch.set_num_threads(1)

CPU = RunContext(torch.device("cpu"), "cpu", torch.float32, False, 0, 0, 1)  # float32 = no autocast
OPTIMIZER = dict(unembedding_lr=0.01, embedding_lr=0.1, matrix_lr=0.05, weight_decay=0.1)
# (targets, subspace): the arms this issue adds
ARMS = [("ffn_v", "principal"), ("all", "unbiased"), ("all", "gradient")]


def variant_model(targets: str, subspace: str, rank_k: int = 4, momentum: str = "dense", **overrides) -> GPT:
    """helpers.tiny_model (2 blocks, width 32, float64, perturbed) with MoleGrad on; subspaces reset in
    float64 so that Q is orthonormal to float64 precision."""
    model = tiny_model(molegrad_rank_k=rank_k, molegrad_targets=targets, molegrad_subspace=subspace,
                       molegrad_momentum=momentum, **overrides)
    for layer in molegrad_layers(model):
        layer.reset_subspace()
    return model


def optimizers_of(model: GPT) -> list[torch.optim.Optimizer]:
    optimizers = setup_optimizers(model, **OPTIMIZER)
    optimizers[1].ns_dtype = torch.float64
    return optimizers


def batches(steps: int, batch: int = 4, length: int = 16, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    tokens = random_tokens(steps * batch, length + 1, seed).view(steps, batch, length + 1)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def full_rank(model: GPT) -> None:
    """Every MoleGradLinear becomes one of rank k = in_features of the same variant and seed."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, MoleGradLinear):
                full = MoleGradLinear(child.in_features, child.out_features, rank_k=child.in_features, seed=child.seed,
                                      subspace=child.subspace).double()
                full.reset_subspace()
                with torch.no_grad():
                    full.weight.copy_(child.weight)
                setattr(module, name, full)


# ---------------------------------------------------------------------------------------------
# layout and options

def test_variant_layouts_and_option_errors():
    unbiased = MoleGradLinear(16, 8, rank_k=6, subspace="unbiased").double()
    unbiased.reset_subspace()
    assert (unbiased.principal_k, unbiased.random_k, unbiased.explore_k) == (3, 3, 4)
    assert unbiased.sketch.shape == (16, 3 + 4) and unbiased.Q.shape == (16, 6)
    torch.testing.assert_close(unbiased.factor_scale, torch.tensor([1, 1, 1, 13 / 3, 13 / 3, 13 / 3], dtype=torch.float64))
    torch.testing.assert_close(unbiased.Q.T @ unbiased.Q, torch.eye(6, dtype=torch.float64), atol=1e-12, rtol=0)
    gradient = MoleGradLinear(16, 8, rank_k=6, subspace="gradient")
    assert gradient.probes.shape == (8, 10) and gradient.probe_sink.shape == (16, 10) and gradient.factor_scale is None
    principal = MoleGradLinear(16, 8, rank_k=6)
    assert principal.probes is None and principal.factor_scale is None and principal.principal_k == 6
    assert set(unbiased.state_dict()) == set(gradient.state_dict()) == set(principal.state_dict())  # nothing new saved
    with pytest.raises(ValueError, match=r"^subspace='bogus': expected one of principal\|unbiased\|gradient"):
        MoleGradLinear(16, 8, rank_k=6, subspace="bogus")
    with pytest.raises(ValueError, match=r"^molegrad_rank_k=1: molegrad_subspace=unbiased needs >= 2"):
        GPTConfig(n_embd=32, n_head=4, n_kv_head=4, molegrad_rank_k=1, molegrad_subspace="unbiased")
    with pytest.raises(ValueError, match=r"^molegrad_subspace=gradient: needs MoleGrad on"):
        GPTConfig(n_embd=32, n_head=4, n_kv_head=4, molegrad_subspace="gradient")


def test_the_flag_reaches_every_compressed_linear():
    model = variant_model("ffn_v", "unbiased")
    names = {name.split(".", 3)[-1] for name, m in model.named_modules() if isinstance(m, MoleGradLinear)}
    assert names == {"attn.c_v", "mlp.c_fc", "mlp.c_proj"}
    assert all(m.subspace == "unbiased" for m in molegrad_layers(model))
    assert all(isinstance(getattr(block.attn, name), nn.Linear) for block in model.transformer.h for name in ("c_q", "c_k", "c_proj"))


# ---------------------------------------------------------------------------------------------
# unbiased: the factor is Gᵀ x Q D, and E[Q D Qᵀ] = I

def test_unbiased_factor_matches_slow_reference():
    layer = MoleGradLinear(12, 7, rank_k=6, subspace="unbiased", seed=1).double()
    layer.reset_subspace()
    x = torch.randn(3, 4, 12, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(3, 4, 7, dtype=torch.float64)
    layer(x).backward(grad_y)
    tokens, grads = x.detach().reshape(-1, 12), grad_y.reshape(-1, 7)
    scale = torch.tensor([1.0] * 3 + [(12 - 3) / 3] * 3, dtype=torch.float64)
    reference = sum(torch.outer(grads[n], (tokens[n] @ layer.Q) * scale) for n in range(tokens.shape[0]))
    torch.testing.assert_close(layer.grad_factor, reference, atol=1e-12, rtol=0)
    torch.testing.assert_close(x.grad, grad_y @ layer.weight.detach(), atol=1e-12, rtol=0)  # dX stays exact


def test_unbiased_random_part_is_redrawn_each_update_orthogonal_and_deterministic():
    layers = [MoleGradLinear(16, 8, rank_k=6, subspace="unbiased", seed=4).double() for _ in range(2)]
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(32, 16, generator=generator, dtype=torch.float64) for _ in range(3)]
    parts = []
    for layer in layers:
        layer.reset_subspace()
        for x in inputs:
            layer(x)
            layer.update_subspace()
            parts.append(layer.Q[:, 3:].clone())
            torch.testing.assert_close(layer.Q.T @ layer.Q, torch.eye(6, dtype=torch.float64), atol=1e-12, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(parts[:3], parts[3:]))  # the same in every process
    assert not torch.allclose(parts[0], parts[1]) and not torch.allclose(parts[1], parts[2])


def test_unbiased_expected_projection_is_the_identity():
    """Over n draws of the random part (one per update index, the principal part held), the mean of
    P = Q D Qᵀ equals I within 5 standard errors per entry (σ̂ / √n, σ̂ each entry's sample spread);
    the unscaled projection Q Qᵀ, the biased estimator, misses I by far more."""
    layer = MoleGradLinear(12, 4, rank_k=6, subspace="unbiased", seed=2).double()
    layer.reset_subspace()
    n, d = 4000, torch.diag(layer.factor_scale)
    scaled, plain = [], []
    for index in range(n):
        layer.num_updates = index
        redraw([layer])
        scaled.append(layer.Q @ d @ layer.Q.T)
        plain.append(layer.Q @ layer.Q.T)
    scaled, plain = torch.stack(scaled), torch.stack(plain)
    identity = torch.eye(12, dtype=torch.float64)
    standard_error = scaled.std(dim=0) / n ** 0.5
    assert standard_error.min() > 0
    assert ((scaled.mean(dim=0) - identity).abs() <= 5 * standard_error).all()
    assert (plain.mean(dim=0) - identity).abs().max() > 20 * standard_error.max()


# ---------------------------------------------------------------------------------------------
# gradient: the probes are dWᵀ R, and the blend finds what the inputs' variance hides

def test_gradient_probe_image_is_dw_transpose_r():
    layer = MoleGradLinear(12, 7, rank_k=3, subspace="gradient", seed=1).double()
    layer.reset_subspace()
    x, grad_y = torch.randn(10, 12, dtype=torch.float64), torch.randn(10, 7, dtype=torch.float64)
    layer(x[:4]).backward(grad_y[:4])
    layer(x[4:]).backward(grad_y[4:])  # two micro-batches add up
    torch.testing.assert_close(layer.probe_sink.grad, (grad_y.T @ x).T @ layer.probes, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.grad_factor, grad_y.T @ x @ layer.Q, atol=1e-12, rtol=0)


@pytest.mark.parametrize("keep_h", [False, True])
def test_gradient_probe_images_of_the_mlp_match_autograd(keep_h):
    d = 6
    fc = MoleGradLinear(d, 4 * d, rank_k=2, subspace="gradient", seed=1).double()
    proj = MoleGradLinear(4 * d, d, rank_k=3, subspace="gradient", seed=2).double()
    for layer in (fc, proj):
        layer.reset_subspace()
    ref_fc, ref_proj = nn.Linear(d, 4 * d, bias=False).double(), nn.Linear(4 * d, d, bias=False).double()
    ref_fc.weight.data.copy_(fc.weight)
    ref_proj.weight.data.copy_(proj.weight)
    x = torch.randn(2, 5, d, dtype=torch.float64)
    molegrad_mlp(x, fc, proj, keep_h).sin().sum().backward()
    ref_proj(F.relu(ref_fc(x)).square()).sin().sum().backward()
    torch.testing.assert_close(fc.probe_sink.grad, ref_fc.weight.grad.T @ fc.probes, atol=1e-12, rtol=0)
    torch.testing.assert_close(proj.probe_sink.grad, ref_proj.weight.grad.T @ proj.probes, atol=1e-12, rtol=0)
    torch.testing.assert_close(dense_grad(proj), ref_proj.weight.grad @ proj.Q @ proj.Q.T, atol=1e-12, rtol=0)


def test_gradient_variant_finds_the_gradient_heavy_direction_the_inputs_variance_hides():
    """x has 8 strong directions (variance 1) and a weak one, b (variance 0.09); the gradient at the
    output depends only on x·b, so dW = u (Σ (x·b) x)ᵀ lies mostly along b (the rest: the batch's
    chance correlation of x·b with the strong directions). The principal subspace (k = 4) keeps strong
    directions and misses b; the gradient variant moves b into Q. (H1 of issue 26, in miniature.)"""
    generator = torch.Generator().manual_seed(0)
    basis = orthonormalize(torch.randn(32, 9, generator=generator, dtype=torch.float64))
    strong, b = basis[:, :8], basis[:, 8]
    u = torch.randn(6, generator=generator, dtype=torch.float64)
    captured, overlap = {}, {}
    for subspace in ("principal", "gradient"):
        layer = MoleGradLinear(32, 6, rank_k=4, subspace=subspace, seed=3).double()
        layer.reset_subspace()
        for _ in range(30):
            x = torch.randn(512, 8, generator=generator, dtype=torch.float64) @ strong.T \
                + 0.3 * torch.randn(512, 1, generator=generator, dtype=torch.float64) * b
            grad_y = torch.outer(x @ b, u)                                       # G = (x·b) uᵀ
            layer(x).backward(grad_y)
            dw = grad_y.T @ x
            layer.update_subspace()
        captured[subspace] = ((dw @ layer.Q).square().sum() / dw.square().sum()).item()
        overlap[subspace] = (layer.Q.T @ b).square().sum().item()
    assert overlap["principal"] < 0.05 and overlap["gradient"] > 0.95, overlap
    assert captured["principal"] < 0.2 and captured["gradient"] > 0.8, captured


# ---------------------------------------------------------------------------------------------
# every arm at k = in is dense training

@pytest.mark.parametrize("momentum", ["dense", "lowrank"])
@pytest.mark.parametrize("targets, subspace", ARMS + [("all", "gradient_block")])
def test_full_rank_training_steps_equal_dense(targets, subspace, momentum):
    """Three optimizer steps with clipping, weight decay, subspace updates and redraws: losses, norms
    and weights equal dense training's (gradient_block: the gradient variant under block recompute,
    whose MLP keeps h and x for its probes)."""
    overrides = dict(recompute="block") if subspace == "gradient_block" else {}
    subspace = subspace.removesuffix("_block")
    dense = tiny_model()
    compressed = variant_model(targets, subspace, momentum=momentum, **overrides)
    full_rank(compressed)
    dense.load_state_dict({k: v for k, v in compressed.state_dict().items() if k in dense.state_dict()})
    assert_trains_like_dense(dense, compressed, optimizers_of, batches(3))


@pytest.mark.slow
@pytest.mark.parametrize("subspace", ["unbiased", "gradient"])
def test_compiled_training_compiles_once_and_matches_eager(subspace):
    """The variants' extra inputs (the factor's column scale, the probes and their sink) keep the
    graph one graph with no recompile as the subspace updates and redraws."""
    from torch._dynamo.utils import counters

    eager, twin = (variant_model("all", subspace, momentum="lowrank", n_layer=1) for _ in range(2))
    torch._dynamo.reset()
    counters.clear()
    model = torch.compile(twin, backend="aot_eager")
    for runner, target in ((eager, eager), (model, twin)):
        optimizers = optimizers_of(target)
        for batch in batches(4):
            train_step(runner, optimizers, iter([batch]), 1, CPU, 1.0, 0.9, 1.0)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"] and not counters["graph_break"]
    for (name, a), b in zip(eager.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=0, msg=name)


# ---------------------------------------------------------------------------------------------
# exact resume and several processes

@pytest.mark.parametrize("targets, subspace", ARMS)
def test_resume_mid_run_is_bit_exact(targets, subspace):
    """Two steps, then model and optimizer states into a fresh model of another init; two more steps
    on each: every tensor bit-identical (the gradient variant's probes are drawn again on load)."""
    steps = batches(4)
    model = variant_model(targets, subspace, momentum="lowrank")
    optimizers = optimizers_of(model)
    for batch in steps[:2]:
        train_step(model, optimizers, iter([batch]), 1, CPU, 1.0, 0.9, 1.0)
    saved_model, saved_optimizers = copy.deepcopy(model.state_dict()), [copy.deepcopy(o.state_dict()) for o in optimizers]
    resumed = tiny_model(seed=1, molegrad_rank_k=4, molegrad_targets=targets, molegrad_subspace=subspace,
                         molegrad_momentum="lowrank")
    resumed.load_state_dict(saved_model)
    resumed_optimizers = optimizers_of(resumed)
    for opt, state in zip(resumed_optimizers, saved_optimizers):
        opt.load_state_dict(state)
    if subspace == "gradient":
        assert all(torch.equal(a.probes, b.probes) for a, b in zip(molegrad_layers(model), molegrad_layers(resumed)))
    for batch in steps[2:]:
        losses = [train_step(m, o, iter([batch]), 1, CPU, 1.0, 0.9, 1.0)[0]
                  for m, o in ((model, optimizers), (resumed, resumed_optimizers))]
        assert losses[0] == losses[1]
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.multiprocess
@pytest.mark.parametrize("targets, subspace", ARMS)
def test_two_processes_equal_one(tmp_path, targets, subspace):
    """Each of two gloo processes takes half of every batch: the same model as one process (the
    statistics, and the gradient variant's probe images, are summed across processes)."""
    single = variant_model(targets, subspace, momentum="lowrank")
    states, _ = train_in_two_gloo_processes(single, batches(3), OPTIMIZER, tmp_path)
    optimizers = optimizers_of(single)
    for batch in batches(3):
        train_step(single, optimizers, iter([batch]), 1, CPU, 1.0, 0.9, 1.0)
    assert all(m.num_updates == 3 for m in molegrad_layers(single))
    for state in states:
        for name, value in single.state_dict().items():
            torch.testing.assert_close(state[name], value, atol=1e-10, rtol=0, msg=name)


def test_batched_update_of_many_variant_layers_equals_one_by_one():
    """move_subspaces groups layers of one variant and shape: the same Q, scouts, sketch and probes
    as each layer's own update, for both variants side by side."""
    generator = torch.Generator().manual_seed(0)

    def layers():
        torch.manual_seed(0)  # the weights: the gradient variant's probes see them
        made = [MoleGradLinear(16, 8, rank_k=4, seed=1, subspace="unbiased").double(),
                MoleGradLinear(16, 8, rank_k=4, seed=2, subspace="unbiased").double(),
                MoleGradLinear(16, 8, rank_k=4, seed=3, subspace="gradient").double(),
                MoleGradLinear(16, 12, rank_k=4, seed=4, subspace="gradient").double()]
        for layer in made:
            layer.reset_subspace()
        return made

    together, alone = layers(), layers()
    inputs = [torch.randn(40, 16, generator=generator, dtype=torch.float64) for _ in together]
    for group in (together, alone):
        for step in range(3):
            for layer, x in zip(group, inputs):
                layer(x * (step + 1)).square().sum().backward()
            if group is together:
                move_subspaces(group)
            else:
                for layer in group:
                    layer.update_subspace()
    for a, b in zip(together, alone):
        state = {**a.state_dict(), "probes": a.probes}  # Q, scouts, sketch, energies, counters; the probes
        for name, value in {**b.state_dict(), "probes": b.probes}.items():
            if value is not None:
                torch.testing.assert_close(state[name], value, atol=1e-12, rtol=0, msg=name)
