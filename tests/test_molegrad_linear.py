"""MoleGrad layer: exact dX, factor gradients against slow references, what is saved for backward,
subspace tracking, determinism and resume. Small shapes; float64 where numerics are compared."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.memory_measure import saved_bytes
from nanochat.molegrad import (
    MoleGradLinear, MoleGradStep, move_subspaces, orthonormalize, molegrad_layers, molegrad_mlp,
)
from tests.helpers import dense_grad

torch.set_num_threads(1)


class ReluSquared(torch.autograd.Function):
    """relu(h)², saving only h: the fused activation, without the down-projection, for the memory table."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h)
        return F.relu(h).square()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (h,) = ctx.saved_tensors
        return grad_out * 2 * F.relu(h)


relu_squared = ReluSquared.apply


def low_rank_inputs(basis: torch.Tensor, n: int, noise: float, generator: torch.Generator):
    """x = z diag(scales) basisᵀ + noise: (n, in); basis: (in, r) orthonormal, scales 1 … 0.3."""
    scales = torch.linspace(1.0, 0.3, basis.shape[1], dtype=basis.dtype)
    z = torch.randn(n, basis.shape[1], generator=generator, dtype=basis.dtype)
    x = (z * scales) @ basis.T
    return x + noise * torch.randn(n, basis.shape[0], generator=generator, dtype=basis.dtype)


def energy_fraction(x: torch.Tensor, q: torch.Tensor) -> float:
    return ((x @ q).square().sum() / x.square().sum()).item()


def oracle_fraction(x: torch.Tensor, k: int) -> float:
    """Energy of x in its own top-k principal subspace."""
    singular = torch.linalg.svdvals(x)
    return (singular[:k].square().sum() / singular.square().sum()).item()


def random_orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return orthonormalize(torch.randn(rows, cols, generator=generator, dtype=torch.float64))


def track(layer: MoleGradLinear, basis: torch.Tensor, steps: int, generator: torch.Generator,
          noise: float = 0.1) -> torch.Tensor:
    """steps of training forward + update_subspace on inputs from basis; returns the last x."""
    for _ in range(steps):
        x = low_rank_inputs(basis, 128, noise, generator).to(layer.Q.dtype)
        layer(x)
        layer.update_subspace()
    return x


def molegrad_pair(d: int, rank_fc: int, rank_proj: int) -> tuple[MoleGradLinear, MoleGradLinear]:
    """fc: d -> 4d and proj: 4d -> d, in float64."""
    return (MoleGradLinear(d, 4 * d, rank_k=rank_fc).double(),
            MoleGradLinear(4 * d, d, rank_k=rank_proj).double())


def saved_values_per_token(run, params: list[torch.Tensor], tokens: int) -> float:
    """float32 values saved for backward by run(), one count per storage, parameters excluded."""
    return saved_bytes(run, params)[0] / (4 * tokens)


def test_constructor_validates_arguments():
    with pytest.raises(ValueError, match="rank_k=0"):
        MoleGradLinear(8, 4, rank_k=0)
    with pytest.raises(ValueError, match="rank_k=9.*in_features=8"):
        MoleGradLinear(8, 4, rank_k=9)
    with pytest.raises(ValueError, match="explore_k=3"):
        MoleGradLinear(8, 4, rank_k=6, explore_k=3)
    with pytest.raises(ValueError, match="power_iters=0"):
        MoleGradLinear(8, 4, rank_k=2, power_iters=0)
    with pytest.raises(ValueError, match="warm_start_decay=1.0"):
        MoleGradLinear(8, 4, rank_k=2, warm_start_decay=1.0)
    assert MoleGradLinear(8, 4, rank_k=8).explore_k == 0
    assert MoleGradLinear(64, 4, rank_k=8).explore_k == 4


def test_mlp_with_molegrad_linears_is_exact_at_full_rank():
    d = 6
    fc, proj = molegrad_pair(d, rank_fc=d, rank_proj=4 * d)
    fc.Q.copy_(torch.eye(d))
    proj.Q.copy_(torch.eye(4 * d))
    ref_fc, ref_proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)
    ref_fc.double().weight.data.copy_(fc.weight)
    ref_proj.double().weight.data.copy_(proj.weight)
    x = torch.randn(2, 5, d, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    proj(F.relu(fc(x)).square()).sin().sum().backward()
    ref_proj(F.relu(ref_fc(x_ref)).square()).sin().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(dense_grad(fc), ref_fc.weight.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(dense_grad(proj), ref_proj.weight.grad, atol=1e-10, rtol=0)
    assert fc.weight.grad is None and proj.weight.grad is None


def test_low_rank_factor_matches_slow_reference():
    layer = MoleGradLinear(12, 7, rank_k=5, seed=1).double()
    layer.Q.copy_(random_orthonormal(12, 5, seed=2))
    x = torch.randn(3, 4, 12, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(3, 4, 7, dtype=torch.float64)
    layer(x).backward(grad_y)
    tokens, grads = x.detach().reshape(-1, 12), grad_y.reshape(-1, 7)
    gq_ref = sum(torch.outer(grads[n], tokens[n] @ layer.Q) for n in range(tokens.shape[0]))
    torch.testing.assert_close(layer.grad_factor, gq_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(x.grad, grad_y @ layer.weight.detach(), atol=1e-12, rtol=0)


def test_micro_batches_add_up_to_one_batch():
    layer = MoleGradLinear(10, 6, rank_k=3).double()
    x, grad_y = torch.randn(8, 10, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    layer(x).backward(grad_y)
    whole, sketch_whole = layer.grad_factor.clone(), layer.sketch_step.clone()
    layer.grad_factor = None
    for statistic in layer.step_statistics():
        statistic.zero_()
    for half in (slice(0, 4), slice(4, 8)):
        layer(x[half]).backward(grad_y[half])
    torch.testing.assert_close(layer.grad_factor, whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.sketch_step, sketch_whole, atol=1e-12, rtol=0)


def test_full_width_input_is_not_saved():
    n_tokens, d_in, d_out = 32, 64, 48  # d_out != n_tokens: the weight cannot pass for x
    layer = MoleGradLinear(d_in, d_out, rank_k=8)
    x = torch.randn(4, 8, d_in, requires_grad=True)
    shapes = []

    def pack(tensor):
        shapes.append((tuple(tensor.shape), tensor is layer.weight or tensor is layer.Q))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x)
    # x Q, the weight and Q itself (a buffer, saved so that a Q moved before backward fails)
    assert sorted(shapes) == sorted([((n_tokens, 8), False), ((d_in, 8), True), ((d_out, d_in), True)])


@pytest.mark.parametrize("power_iters", [1, 2])
def test_subspace_tracking_finds_principal_subspace(power_iters):
    generator = torch.Generator().manual_seed(0)
    basis = random_orthonormal(64, 8, seed=1)
    layer = MoleGradLinear(64, 16, rank_k=8, power_iters=power_iters, seed=3)
    x = track(layer, basis, steps=40, generator=generator)
    captured = energy_fraction(x, layer.Q)
    assert captured >= 0.95 * oracle_fraction(x, 8)
    assert abs(layer.captured_energy.item() - captured) < 0.05
    torch.testing.assert_close(layer.Q.T @ layer.Q, torch.eye(8), atol=1e-5, rtol=0)


def test_subspace_update_is_deterministic():
    layers = [MoleGradLinear(32, 8, rank_k=4, seed=5) for _ in range(2)]
    basis = random_orthonormal(32, 6, seed=1)
    for layer in layers:
        track(layer, basis, steps=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(layers[0].Q, layers[1].Q)
    assert torch.equal(layers[0].sketch, layers[1].sketch)
    assert not torch.equal(MoleGradLinear(32, 8, rank_k=4, seed=6).Q, layers[0].Q)


@pytest.mark.parametrize("explore_k", [0, 2])
def test_exploration_finds_an_orthogonal_subspace(explore_k):
    """Noiseless inputs move to a subspace orthogonal to every tracked direction. Power iteration
    alone reaches it only through rounding errors, once the old directions' energy has decayed;
    a fresh direction per update finds it within a few steps."""
    generator = torch.Generator().manual_seed(0)
    layer = MoleGradLinear(32, 8, rank_k=4, explore_k=explore_k, seed=2).double()
    track(layer, random_orthonormal(32, 4, seed=1), steps=10, generator=generator, noise=0.0)
    tracked = torch.cat([layer.Q, layer.scouts], dim=1)
    new_basis = random_orthonormal(32, 4, seed=3)
    new_basis = orthonormalize(new_basis - tracked @ (tracked.T @ new_basis))
    x = track(layer, new_basis, steps=20, generator=generator, noise=0.0)
    if explore_k == 0:
        assert energy_fraction(x, layer.Q) < 0.01
    else:
        assert energy_fraction(x, layer.Q) >= 0.9


def test_update_returns_both_bases_and_drops_the_factor():
    layer = MoleGradLinear(16, 8, rank_k=4)
    layer(torch.randn(10, 16)).sum().backward()
    q_old, q_new = layer.update_subspace()
    assert layer.grad_factor is None and layer.num_updates == 1
    assert q_old.shape == q_new.shape == (16, 4) and not torch.equal(q_old, q_new)
    assert torch.equal(q_new, layer.Q)
    q_same, q_still = layer.update_subspace()  # no forward since the last update
    assert torch.equal(q_same, q_still) and torch.equal(q_still, q_new) and layer.num_updates == 1


def test_update_between_forward_and_backward_raises():
    layer = MoleGradLinear(16, 8, rank_k=4)
    y = layer(torch.randn(10, 16))
    layer.update_subspace()
    with pytest.raises(RuntimeError, match="update_subspace"):
        y.sum().backward()


def test_state_dict_resumes_exactly():
    basis = random_orthonormal(32, 6, seed=1)
    generator = torch.Generator().manual_seed(0)
    layer = MoleGradLinear(32, 8, rank_k=4, seed=5)
    track(layer, basis, steps=5, generator=generator)
    state = {name: value.clone() if torch.is_tensor(value) else value
             for name, value in layer.state_dict().items()}
    assert set(state) == {"weight", "Q", "scouts", "sketch", "input_energy", "captured_energy",
                          "counters"}
    assert all(torch.is_tensor(value) for value in state.values())
    resumed = MoleGradLinear(32, 8, rank_k=4, seed=99)
    resumed.load_state_dict(state)
    for model in (layer, resumed):
        track(model, basis, steps=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(layer.Q, resumed.Q) and resumed.num_updates == 8


def test_meta_device_init_then_reset():
    with torch.device("meta"):
        layer = MoleGradLinear(16, 8, rank_k=4, seed=3)
    layer.to_empty(device="cpu")
    layer.reset_subspace()
    assert torch.equal(layer.Q, MoleGradLinear(16, 8, rank_k=4, seed=3).Q)


def test_gradient_helpers():
    model = nn.Sequential(MoleGradLinear(12, 6, rank_k=3).double(), nn.Tanh(),
                          MoleGradLinear(6, 4, rank_k=2).double())
    model(torch.randn(5, 12, dtype=torch.float64)).sum().backward()
    layers = molegrad_layers(model)
    assert len(layers) == 2
    for layer in layers:
        # ‖grad_factor Qᵀ‖ = ‖grad_factor‖ (Q orthonormal): what clipping relies on
        torch.testing.assert_close(layer.grad_factor.square().sum(), dense_grad(layer).square().sum())
    step = MoleGradStep(model)
    gradients = step.gradients()  # what the training step clips and all-reduces
    assert set(gradients) == {id(layer.weight) for layer in layers}
    assert all(gradients[id(layer.weight)] is layer.grad_factor for layer in layers)
    q_before = [layer.Q.clone() for layer in layers]
    step.finish([])  # after the optimizer step: Q moves, the factor gradients are dropped (the one place)
    assert all(layer.grad_factor is None for layer in layers)
    assert all(not torch.equal(layer.Q, q) for layer, q in zip(layers, q_before))
    assert step.gradients() == {}


def test_subspace_math_runs_without_tf32(monkeypatch):
    """Training turns TF32 on for CUDA matmuls (float32_matmul_precision "high"); the subspace update
    and the momentum transport run at "highest" inside finish() and leave the setting as it was."""
    layer = MoleGradLinear(12, 6, rank_k=3)
    layer(torch.randn(5, 12)).sum().backward()
    seen = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a: (seen.append(torch.get_float32_matmul_precision()), eigh(a))[1])

    class Transport(torch.optim.SGD):
        def transport_subspace(self, layer, q_old, q_new):
            seen.append(torch.get_float32_matmul_precision())

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        MoleGradStep(layer).finish([Transport([layer.weight], lr=0.1)])
        assert seen == ["highest", "highest"]
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_relu_squared_matches_eager_and_saves_only_its_input():
    h = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(relu_squared, (h,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        relu_squared(h)
    assert len(saved) == 1 and saved[0] is h


@pytest.mark.parametrize("keep_h", [False, True])
def test_molegrad_mlp_is_exact_at_full_rank(keep_h):
    d = 6
    fc, proj = molegrad_pair(d, rank_fc=d, rank_proj=4 * d)
    fc.Q.copy_(random_orthonormal(d, d, seed=1))
    proj.Q.copy_(random_orthonormal(4 * d, 4 * d, seed=2))
    w_fc, w_proj = (layer.weight.detach().clone().requires_grad_() for layer in (fc, proj))
    x = torch.randn(2, 5, d, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    molegrad_mlp(x, fc, proj, keep_h).sin().sum().backward()
    F.linear(F.relu(F.linear(x_ref, w_fc)).square(), w_proj).sin().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(dense_grad(fc), w_fc.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(dense_grad(proj), w_proj.grad, atol=1e-10, rtol=0)
    assert fc.tokens_step.item() == proj.tokens_step.item() == 10


def test_mlp_saved_values_per_token():
    d, k, tokens = 32, 4, 16
    fc, proj = MoleGradLinear(d, 4 * d, rank_k=k), MoleGradLinear(4 * d, d, rank_k=k)
    dense_fc, dense_proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)
    params = [fc.weight, proj.weight, dense_fc.weight, dense_proj.weight, fc.Q, proj.Q]  # Q: a buffer, no memory
    x = torch.randn(tokens, d, requires_grad=True)
    modes = {
        "dense": (lambda: dense_proj(F.relu(dense_fc(x)).square()), 9 * d),
        "MoleGrad on both linears": (lambda: proj(F.relu(fc(x)).square()), 4 * d + 2 * k),
        "... with relu_squared()": (lambda: proj(relu_squared(fc(x))), 4 * d + 2 * k),
        "molegrad_mlp()": (lambda: molegrad_mlp(x, fc, proj), d + 2 * k),
        "molegrad_mlp(keep_h=True)": (lambda: molegrad_mlp(x, fc, proj, keep_h=True), 4 * d + 2 * k),
    }
    for name, (run, expected) in modes.items():
        measured = saved_values_per_token(run, params, tokens)
        print(f"{name:28s} {measured / d:5.2f}d")
        assert measured == expected, name


def test_bf16_autocast_runs_and_accumulates_in_fp32():
    d = 16
    layer = MoleGradLinear(d, d, rank_k=4)
    fc, proj = MoleGradLinear(d, 4 * d, rank_k=4), MoleGradLinear(4 * d, d, rank_k=4)
    x = torch.randn(2, 8, d, requires_grad=True)
    saved_dtypes = set()

    def pack(tensor):
        if not isinstance(tensor, nn.Parameter) and not any(tensor is m.Q for m in (layer, fc, proj)):
            saved_dtypes.add(tensor.dtype)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = molegrad_mlp(layer(x), fc, proj)
    assert y.dtype == torch.bfloat16 and saved_dtypes == {torch.bfloat16}
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    assert all(m.grad_factor.dtype == torch.float32 for m in (layer, fc, proj))
    x_ref = x.detach().clone().requires_grad_()
    molegrad_mlp(layer(x_ref), fc, proj).sum().backward()
    scale = x_ref.grad.abs().max().item()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0.1, atol=0.1 * scale)


def test_moving_many_subspaces_at_once_equals_one_by_one():
    """move_subspaces batches layers of equal shapes (one eigh, one QR per group): the same Q,
    scouts, sketch and energies as each layer's own update_subspace(); a layer without tokens
    stays put."""
    generator = torch.Generator().manual_seed(0)
    def layers():
        return [MoleGradLinear(16, 8, rank_k=4, seed=1).double(), MoleGradLinear(16, 12, rank_k=4, seed=2).double(),
                MoleGradLinear(24, 8, rank_k=3, seed=3).double(), MoleGradLinear(16, 8, rank_k=4, seed=4).double()]
    together, alone = layers(), layers()
    inputs = [torch.randn(40, layer.in_features, generator=generator, dtype=torch.float64) for layer in together]
    for group in (together, alone):
        for step in range(3):
            for layer, x in list(zip(group, inputs))[:3]:  # the last layer sees no tokens
                layer(x * (step + 1))
            if group is together:
                moved = move_subspaces(group)
                assert moved[3][0] is moved[3][1]
            else:
                for layer in group:
                    layer.update_subspace()
    for a, b in zip(together, alone):
        for name in ("Q", "scouts", "sketch", "input_energy", "captured_energy", "counters"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-12, rtol=0, msg=name)
    assert [layer.num_updates for layer in together] == [3, 3, 3, 0]
