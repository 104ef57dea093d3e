"""Muon, the optimizer groups of the model, and the LR / momentum schedules."""

from __future__ import annotations

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import Muon, apply_lr, setup_optimizers, get_lr_multiplier, get_muon_momentum, zeropower_via_newtonschulz5

torch.set_num_threads(1)


@pytest.mark.parametrize("shape", [(48, 96), (96, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_orthogonalises(shape, dtype):
    grad = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ortho = zeropower_via_newtonschulz5(grad, steps=5, dtype=dtype).double()
    assert ortho.shape == grad.shape and ortho.dtype == torch.float64
    singular_values = torch.linalg.svdvals(ortho)
    assert singular_values.min() > 0.5 and singular_values.max() < 1.5
    u, _, vh = torch.linalg.svd(grad.double(), full_matrices=False)
    polar = u @ vh  # the exact orthogonalisation U Vᵀ
    cosine = (ortho * polar).sum() / (ortho.norm() * polar.norm())
    assert cosine > 0.95


def test_newton_schulz_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        zeropower_via_newtonschulz5(torch.randn(2, 3, 4))


def test_muon_decreases_a_quadratic():
    torch.manual_seed(0)
    a = torch.randn(32, 16)
    target = a @ torch.randn(16, 24) * 0.1  # reachable: the minimum is 0
    weight = torch.nn.Parameter(torch.zeros(16, 24))
    opt = Muon([weight], lr=0.05, momentum=0.9, ns_dtype=torch.float32)

    def loss_fn() -> torch.Tensor:
        return 0.5 * (a @ weight - target).square().mean()

    losses = []
    for _ in range(40):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_muon_update_scale_weight_decay_and_gradient_hook():
    """One step from a zero momentum: W <- W (1 - lr wd) - lr sqrt(max(1, rows/cols)) NS(g)."""
    grad = torch.randn(40, 10)
    for nesterov in (True, False):
        weight = torch.nn.Parameter(torch.ones(40, 10))
        weight.grad = grad.clone()
        Muon([weight], lr=0.1, momentum=0.5, nesterov=nesterov, weight_decay=0.2, ns_dtype=torch.float32).step()
        momentum_update = grad * (0.75 if nesterov else 0.5)  # lerp(g, 0.5 g, 0.5) or 0.5 g
        expected = torch.ones(40, 10) * (1 - 0.1 * 0.2) - 0.1 * 2.0 * zeropower_via_newtonschulz5(momentum_update, dtype=torch.float32)
        torch.testing.assert_close(weight.detach(), expected)

    class FixedGradientMuon(Muon):
        def _gradient(self, p):
            return torch.ones_like(p)

    weight = torch.nn.Parameter(torch.zeros(4, 4))
    FixedGradientMuon([weight], lr=1.0, ns_dtype=torch.float32).step()  # p.grad is None: the hook supplies it
    assert weight.detach().abs().sum() > 0


def test_muon_rejects_bad_arguments():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="momentum"):
        Muon([torch.nn.Parameter(torch.zeros(3, 3))], momentum=1.0)


def test_setup_optimizers_partitions_parameters_exactly_once():
    model = GPT(GPTConfig(sequence_len=16, vocab_size=50, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    adamw, muon = setup_optimizers(model, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.1)
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, Muon)
    grouped = [id(p) for opt in (adamw, muon) for group in opt.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    assert all(p.ndim == 2 for group in muon.param_groups for p in group["params"])
    scale = (32 / 768) ** -0.5
    assert [g["lr"] for g in adamw.param_groups] == pytest.approx([0.004 * scale, 0.2 * scale])
    assert muon.param_groups[0]["lr"] == 0.02 and muon.param_groups[0]["weight_decay"] == 0.1
    assert all(g["initial_lr"] == g["lr"] for opt in (adamw, muon) for g in opt.param_groups)
    apply_lr([adamw, muon], 0.5)
    assert muon.param_groups[0]["lr"] == pytest.approx(0.01)
    assert adamw.param_groups[1]["lr"] == pytest.approx(0.1 * scale)


def test_lr_multiplier_schedule():
    # 100 steps, 10 warmup, 20 warmdown to 0.1
    lrm = lambda step: get_lr_multiplier(step, 100, warmup_ratio=0.1, warmdown_ratio=0.2, final_lr_frac=0.1)
    assert lrm(0) == pytest.approx(0.1)
    assert lrm(9) == pytest.approx(1.0)
    assert lrm(10) == lrm(50) == lrm(80) == 1.0
    assert lrm(90) == pytest.approx(0.5 + 0.5 * 0.1)
    assert lrm(100) == pytest.approx(0.1)
    assert get_lr_multiplier(0, 10) == 1.0  # defaults: no warmup
    assert get_lr_multiplier(10, 10) == 0.0  # warmdown to final_lr_frac=0
    with pytest.raises(ValueError, match="num_iterations"):
        get_lr_multiplier(0, 0)
    with pytest.raises(ValueError, match="warmup_ratio"):
        get_lr_multiplier(0, 10, warmup_ratio=0.9, warmdown_ratio=0.2)


def test_muon_momentum_warmup():
    assert get_muon_momentum(0) == pytest.approx(0.85)
    assert get_muon_momentum(150) == pytest.approx(0.90)
    assert get_muon_momentum(300) == get_muon_momentum(10_000) == pytest.approx(0.95)
