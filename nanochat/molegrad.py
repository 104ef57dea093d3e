"""
MoleGrad: low-rank weight gradients for large Linear layers.

For a Linear y = x Wᵀ with x: (N, in), W: (out, in) and N the tokens of a micro-batch, backward
needs dX = G W and dW = Gᵀ x, where G = dL/dy: (N, out). Dense training keeps x alive from forward
to backward: N·in values per layer. MoleGrad keeps xq = x Q instead, (N, k), where Q: (in, k) has
orthonormal columns and persists across steps, and returns

    dX = G W           exact, so the approximation never leaks into other layers
    dW ≈ gq Qᵀ         as the factor gq = Gᵀ xq: (out, k); the (out, in) product is never formed,
                       and the matmul costs out·N·k FLOPs instead of out·N·in

The factor lands in `layer.grad_factor` (float32, summed over the micro-batches of a step, which
all use the same Q); `weight.grad` stays None. An optimizer reads (layer.grad_factor, layer.Q).
grad_factor is the gradient of a leaf, `grad_sink` (out, k), that forward passes to the autograd
Function: backward returns the factor as that leaf's gradient, so forward and backward change no
Python state and torch.compile traces them into one graph (the statistics are buffer updates).

Which Q. The error of dW is Gᵀ x (I - Q Qᵀ): small when Q spans the directions in which x has
most of its energy, the top-k eigenvectors of C = xᵀx / N. Each layer tracks them from the inputs
it sees, as warm-started subspace (power) iteration on B = [Q | scouts]: (in, k+e):

    forward, training:   Y += xᵀ (x B)                 (in, k+e); x B reuses xq, so this costs
                                                        N·in·(k+2e) FLOPs on top of the layer
    update_subspace():   S ← β S + (1-β) Y / N         S ≈ C̄ B, C̄ an average of C over steps,
                                                        β = warm_start_decay
                         R = sym(Bᵀ S) = V Λ Vᵀ        Rayleigh–Ritz: the energy of each
                         S ← S V                         direction of span(B), strongest first
                         S[:, -1] ← random             the weakest direction makes room for a
                                                        fresh one, so no direction is out of reach
                         B ← orth(S)                   QR with diag(R) > 0: deterministic, so
                                                        every process computes the same B

The first k directions compress x; the e = explore_k scouts are tracked the same way but used only
to find directions worth promoting (oversampling speeds convergence from λ_k+1/λ_k to
λ_k+e+1/λ_k per step). Power iteration alone reaches a subspace orthogonal to every tracked
direction only through rounding errors, once the old directions' energy has decayed; the fresh
direction finds it within a few steps (test_exploration_finds_an_orthogonal_subspace).
power_iters > 1 applies the micro-batch's C more times in forward (Y = C orth(C ... B)), each
costing 2·N·in·(k+e) FLOPs.

Update ordering. Q changes only in update_subspace(), which the training loop calls once per
optimizer step, after optimizer.step(): every micro-batch of a step, its backward and the optimizer
see the same Q. It returns (Q_old, Q_new) for an optimizer that keeps state in Q's coordinates.
Q's version is no Python int that a compiled graph would guard on: forward saves Q itself, so a
Q moved before backward fails there through autograd's in-place check (eager). update_subspace()
runs outside the model's forward, so outside any compiled graph.

Subspace variants (--molegrad_subspace; issue 26 asks whether the inputs' principal subspace is the
right Q for attention). Each keeps the factor's (out, k) shape and Q orthonormal, so the optimizer,
the transport and DDP see no difference, and each equals dense training at k = in:
    principal   (default) as above.
    unbiased    Q = [Q_p | Q_r]: p = k - k // 2 tracked principal directions, and r = k // 2 directions
                drawn uniformly from the orthogonal complement of Q_p at every update (redraw(), from
                (seed, num_updates): the same in every process, and after a resume). The factor's Q_r
                columns are scaled by (in - p) / r, so that dW ≈ Gᵀ x Q D Qᵀ with E[Q D Qᵀ] = I: an
                unbiased weight gradient (as PRAC, arXiv 2602.23111), at a variance price.
    gradient    the sketch follows (C / tr C + M / tr M) B instead of C B: M = dWᵀ dW, the weight
                gradient's second moment in the input space, from probes Y = dWᵀ R = Σ xᵀ (G R)
                (R: (out, t) Gaussian, drawn per update) that backward computes where G is at hand,
                summed over micro-batches and processes: the step's dW is never formed. Backward
                needs x: these layers keep their input (attention's is kept by its norm anyway; under
                block recompute it is re-materialised).

Memory: molegrad_mlp() saves d + 2k values per token: x, x Q1 and relu²(h) Q2 (h is recomputed in
backward); with keep_h, h in place of x: 4d + 2k, and backward skips the recompute
(tests/test_molegrad_linear.py::test_mlp_saved_values_per_token). In the model the RMSNorm before
the MLP keeps x anyway, so per token the MoleGrad MLP saves d + 2k values, with keep_h 5d + 2k,
against the dense MLP's 5d (x and h; tests/test_molegrad.py -k saved_bytes). What each variant
saves, and why ReLU² makes compressing W2's input worthless unless h is recomputed: docs/memory.md.
"""

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from nanochat.ops import compute_dtype


def diagonal_signs(matrix: Tensor) -> Tensor:
    """±1 per column: the sign of matrix's diagonal entry, + for 0. (..., rows, cols) -> (..., cols)"""
    return torch.where(torch.diagonal(matrix, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(matrix.dtype)


def orthonormalize(matrix: Tensor) -> Tensor:
    """Q of the QR decomposition of matrix (..., rows, cols), signs fixed so that diag(R) ≥ 0."""
    q, r = torch.linalg.qr(matrix)
    return q * diagonal_signs(r).unsqueeze(-2)


# Muon's momentum for a MoleGrad matrix: dense (out, in), or (out, k) factors in Q's coordinates
MOLEGRAD_MOMENTA = ("dense", "lowrank")
# --molegrad_targets -> the Linears of every block (GPT's names) that MoleGrad compresses
MOLEGRAD_TARGET_LINEARS = {
    "ffn_only": ("mlp.c_fc", "mlp.c_proj"),
    "attn_only": ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj"),
    "all": ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    "ffn_v": ("attn.c_v", "mlp.c_fc", "mlp.c_proj"),  # q, k and the attention output stay dense
}
MOLEGRAD_TARGETS = tuple(MOLEGRAD_TARGET_LINEARS)
# --molegrad_subspace -> what Q spans (module docstring, "Subspace variants")
MOLEGRAD_SUBSPACES = ("principal", "unbiased", "gradient")


def check_options(rank_k: int, power_iters: int, warm_start_decay: float, in_features: int | None = None,
                  prefix: str = "", subspace: str = "principal") -> None:
    """The value checks of MoleGrad's options, for a layer and for a model's config alike (`prefix`
    names the option as its owner spells it, e.g. "molegrad_"); in_features None: no upper bound on k."""
    if subspace not in MOLEGRAD_SUBSPACES:
        raise ValueError(f"{prefix}subspace={subspace!r}: expected one of {'|'.join(MOLEGRAD_SUBSPACES)}")
    if rank_k < 1 or (in_features is not None and rank_k > in_features):
        bound = f" <= in_features={in_features}, the input width of the compressed Linears" if in_features is not None else ""
        raise ValueError(f"{prefix}rank_k={rank_k}: expected 1 <= {prefix}rank_k{bound}")
    if subspace == "unbiased" and rank_k < 2:
        raise ValueError(f"{prefix}rank_k={rank_k}: {prefix}subspace=unbiased needs >= 2 "
                         f"(k - k // 2 principal directions and k // 2 random ones)")
    if power_iters < 1:
        raise ValueError(f"{prefix}power_iters={power_iters}: expected >= 1")
    if not 0.0 <= warm_start_decay < 1.0:
        raise ValueError(f"{prefix}warm_start_decay={warm_start_decay}: expected a value in [0, 1)")


class MoleGradLinear(nn.Module):
    """Drop-in for nn.Linear(in_features, out_features, bias=False) with MoleGrad weight gradients.

    rank_k: directions that compress the input (1 ≤ rank_k ≤ in_features).
    explore_k: scout directions tracked beside them (default min(4, in_features - rank_k)).
    power_iters: applications of the micro-batch covariance per forward (≥ 1).
    warm_start_decay: β of the sketch's running average (0 ≤ β < 1).
    seed: seeds the initial subspace and the fresh directions; give each layer its own.
    subspace: principal | unbiased | gradient (module docstring, "Subspace variants").
    """

    def __init__(self, in_features: int, out_features: int, rank_k: int, power_iters: int = 1,
                 warm_start_decay: float = 0.95, explore_k: int | None = None, seed: int = 0,
                 subspace: str = "principal"):
        super().__init__()
        check_options(rank_k, power_iters, warm_start_decay, in_features, subspace=subspace)
        if explore_k is None:
            explore_k = min(4, in_features - rank_k)
        if not 0 <= explore_k <= in_features - rank_k:
            raise ValueError(f"explore_k={explore_k}: expected 0 <= explore_k <= "
                             f"in_features - rank_k = {in_features - rank_k}")
        self.in_features, self.out_features = in_features, out_features
        self.rank_k, self.explore_k = rank_k, explore_k
        self.power_iters, self.warm_start_decay, self.seed = power_iters, warm_start_decay, seed
        self.subspace = subspace
        # Q = [tracked principal part (in, principal_k) | random part (in, random_k)]; only unbiased has a random part
        self.random_k = rank_k // 2 if subspace == "unbiased" else 0
        self.principal_k = rank_k - self.random_k
        tracked = self.principal_k + explore_k
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        # persistent: the subspace and its running statistics, for exact resume
        self.register_buffer("Q", torch.empty(in_features, rank_k))           # compresses x
        self.register_buffer("scouts", torch.empty(in_features, explore_k))   # tracked, unused
        self.register_buffer("sketch", torch.empty(in_features, tracked))     # ≈ C̄ [Q_principal | scouts]
        self.register_buffer("input_energy", torch.empty(()))                 # running ‖x‖²/N
        self.register_buffer("captured_energy", torch.empty(()))              # ‖x Q‖² / ‖x‖²
        # [seed, num_updates]: tensors, so that state_dict() holds tensors only; the Python ints
        # self.seed and self.num_updates mirror them (read per forward without a device sync)
        self.register_buffer("counters", torch.zeros(2, dtype=torch.long))
        # this step's statistics: what several processes all-reduce (sum) before an update
        self.register_buffer("sketch_step", torch.empty(in_features, tracked), persistent=False)
        # (1,), not 0-dim: torch.compile (2.13) drops in-place updates of 0-dim buffers made in a graph
        self.register_buffer("energy_step", torch.empty(1), persistent=False)
        self.register_buffer("tokens_step", torch.empty(1, dtype=torch.long), persistent=False)
        # the factor gradient's home: backward returns gq = Gᵀ x Q as this leaf's gradient, so
        # autograd sums it over micro-batches into grad_sink.grad and no Python state changes
        # inside forward or backward (torch.compile traces both). Its values are never read.
        self.register_buffer("grad_sink", torch.zeros(out_features, rank_k, requires_grad=True), persistent=False)
        # unbiased: dW ≈ Gᵀ x Q D Qᵀ with D = diag(1 for the principal columns, (in - principal_k) / random_k for
        # the random ones), so that E[Q D Qᵀ] = I; backward scales the factor's columns by D
        self.register_buffer("factor_scale", None if subspace != "unbiased" else torch.cat([
            torch.ones(self.principal_k), torch.full((self.random_k,), (in_features - self.principal_k) / self.random_k)]),
            persistent=False)
        # gradient: R (out, t) drawn each update from (seed, num_updates); backward returns xᵀ (G R) = dWᵀ R of
        # each micro-batch as probe_sink's gradient (summed over micro-batches and processes: the step's dWᵀ R)
        self.register_buffer("probes", None if subspace != "gradient" else torch.empty(out_features, tracked),
                             persistent=False)
        self.register_buffer("probe_sink", None if subspace != "gradient" else
                             torch.zeros(in_features, tracked, requires_grad=True), persistent=False)
        self.num_updates = 0                     # Q's version, mirrored in counters[1]; read outside forward only
        # False while a recompute reruns forward (Block's checkpoint): statistics are taken once
        self.observing = True
        self.register_load_state_dict_post_hook(_read_counters_after_load)
        self.reset_parameters()
        self.reset_subspace()

    def reset_parameters(self) -> None:
        """The weight's init, as nn.Linear does it."""
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    @torch.no_grad()
    def reset_subspace(self) -> None:
        """A random orthonormal subspace from the seed; call it after to_empty() of a meta model
        (on the meta device there are no values to set: nothing is drawn)."""
        if self.Q.is_meta:
            return
        generator = torch.Generator().manual_seed(self.seed)
        tracked = self.rank_k + self.explore_k
        basis = orthonormalize(torch.randn(self.in_features, tracked, generator=generator,
                                           device="cpu", dtype=torch.float64))
        self.Q.copy_(basis[:, :self.rank_k])
        self.scouts.copy_(basis[:, self.rank_k:])
        for buffer in (self.sketch, self.input_energy, self.captured_energy, self.sketch_step,
                       self.energy_step, self.tokens_step):
            buffer.zero_()
        self.num_updates = 0
        self.counters.copy_(torch.tensor([self.seed, 0]))
        self.grad_factor = None
        if self.probe_sink is not None:
            self.probe_sink.grad = None
        redraw([self])

    def _apply(self, fn, recurse: bool = True):
        """Moves the subspace buffers with the module but never casts them to 16-bit floats.

        model.to(torch.bfloat16) (or .half()) casts only the weight; Q, the sketch and the energies
        stay float32 (float64 casts, as in tests, apply): power iteration and QR in bf16 would
        lose the subspace within a few updates, and resume would not be exact. The gradient sink
        stays a leaf that requires grad.
        """
        before = {name: buffer for name, buffer in self._buffers.items()
                  if buffer is not None and buffer.is_floating_point()}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype in (torch.float16, torch.bfloat16) and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        for name in ("grad_sink", "probe_sink"):
            sink = self._buffers[name]
            if sink is not None:
                self._buffers[name] = torch.zeros(sink.shape, dtype=sink.dtype, device=sink.device, requires_grad=True)
        return self

    @property
    def grad_factor(self) -> Tensor | None:
        """(out, k), float32 (float64 for a float64 layer): dW ≈ grad_factor @ Q.T, summed over the
        micro-batches since the last update; None before the first backward."""
        return self.grad_sink.grad

    @grad_factor.setter
    def grad_factor(self, value: Tensor | None) -> None:
        self.grad_sink.grad = value

    def forward(self, x: Tensor) -> Tensor:
        dtype = compute_dtype(x.device.type, x.dtype)
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(x.to(dtype), self.weight.to(dtype))
        x2d = x.reshape(-1, x.shape[-1]).to(dtype)                       # (N, in)
        with torch.no_grad():
            xq = x2d @ self.Q.to(dtype)                                  # (N, k)
            if self.training and self.observing:
                self.add_statistics(*subspace_statistics(x2d, xq[:, :self.principal_k], self.scouts, self.power_iters),
                                    x2d.shape[0])
        return MoleGradLinearFunction.apply(x, self.weight, xq, self.Q, self.grad_sink, self.factor_scale, self.probes,
                                            self.probe_sink)

    @torch.no_grad()
    def add_statistics(self, sketch: Tensor, energy: Tensor, tokens: int) -> None:
        """Adds one micro-batch's statistics (subspace_statistics) to this step's."""
        self.sketch_step.add_(sketch.to(self.sketch_step.dtype))
        self.energy_step.add_(energy.to(self.energy_step.dtype))
        self.tokens_step.add_(tokens)

    def step_statistics(self) -> tuple[Tensor, ...]:
        """The tensors to all-reduce (sum) across processes before update_subspace(); the gradient
        variant adds the step's probe image dWᵀ R (in, t), zeros if no backward ran."""
        if self.probe_sink is None:
            return self.sketch_step, self.energy_step, self.tokens_step
        if self.probe_sink.grad is None:
            self.probe_sink.grad = torch.zeros_like(self.probe_sink)
        return self.sketch_step, self.energy_step, self.tokens_step, self.probe_sink.grad

    def update_subspace(self, observed: bool | None = None) -> tuple[Tensor, Tensor]:
        """Moves Q one power-iteration step towards the inputs' top-k subspace.

        Call once per optimizer step, after optimizer.step(). Returns (Q_old, Q_new), both
        (in, k): state kept in Q's coordinates moves as m_new = m_old (Q_oldᵀ Q_new). Drops
        grad_factor, which is expressed in Q_old. Without training forwards since the last
        update, nothing changes and the same tensor is returned twice (Q_new is Q_old).
        observed: whether tokens_step > 0, if the caller knows (None = read it: a host sync).
        move_subspaces() does this for many layers at once.
        """
        return move_subspaces([self], None if observed is None else [observed])[0]

    def _fresh_direction(self) -> Tensor:
        """A random (in,) float64 vector on the CPU, the same in every process and on every device:
        seeded by (seed, num_updates). move_subspaces sends a group's directions in one copy."""
        generator = torch.Generator().manual_seed(self.seed * 2 ** 32 + self.num_updates)
        return torch.randn(self.in_features, generator=generator, device="cpu", dtype=torch.float64)

    def _variant_draw(self, rows: int, cols: int) -> Tensor:
        """A Gaussian (rows, cols) float64 matrix on the CPU, the same in every process and on every device:
        seeded by (seed, num_updates) in a stream apart from the fresh directions'. What the unbiased
        (its random part) and gradient (its probes) variants draw once per update."""
        generator = torch.Generator().manual_seed(2 ** 63 + self.seed * 2 ** 32 + self.num_updates)
        return torch.randn(rows, cols, generator=generator, device="cpu", dtype=torch.float64)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank_k={self.rank_k}, explore_k={self.explore_k}, "
                f"power_iters={self.power_iters}, warm_start_decay={self.warm_start_decay}"
                + (f", subspace={self.subspace}" if self.subspace != "principal" else ""))


@torch.no_grad()
def move_subspaces(layers: list[MoleGradLinear], observed: list[bool] | None = None) -> list[tuple[Tensor, Tensor]]:
    """update_subspace() of every layer, (Q_old, Q_new) each, with one eigh and one QR per group of
    layers of the same shapes (the attention Linears of all blocks are one group) and at most one
    host sync (`observed`: whether each layer saw tokens this step; None = read tokens_step).

    Per layer, B = [Q_p | scouts] (in, t), t = p + e, Q_p the tracked first p = principal_k columns of Q:
        S ← β S + (1-β) sketch_step / tokens        ≈ C̄ B   (gradient variant: blended_sketch)
        R = sym(Bᵀ S) = V Λ Vᵀ,  S ← S V            Rayleigh–Ritz, strongest first, signs kept
        S[:, -1] ← fresh direction; B ← orth(S)     QR with diag(R) ≥ 0
        S[:, -1] ← λ_(t-1) B[:, -1]                 the fresh one starts at the weakest kept energy
    then redraw(): the unbiased variant's random part of Q, the gradient variant's probes.
    Every layer's factor gradient (and probe image) is dropped (the one place it is cleared: the
    step is over, and once Q moves it would be expressed in the old basis).
    """
    probe_images: dict[int, Tensor | None] = {}
    for layer in layers:
        layer.grad_factor = None
        if layer.probe_sink is not None:  # gradient variant: the step's dWᵀ R, read below
            probe_images[id(layer)] = layer.probe_sink.grad
            layer.probe_sink.grad = None
        if layer.sketch.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"subspace buffers are {layer.sketch.dtype}: expected float32 or "
                             f"float64; cast only the weight to low precision")
    if observed is None:
        observed = (torch.cat([layer.tokens_step for layer in layers]) > 0).tolist() if layers else []
    moved: list[tuple[Tensor, Tensor] | None] = [None] * len(layers)
    groups: dict[tuple, list[tuple[int, MoleGradLinear, Tensor]]] = {}
    for index, (layer, seen) in enumerate(zip(layers, observed)):
        q_old = layer.Q.clone()
        if not seen:
            moved[index] = (q_old, q_old)
            continue
        key = (layer.in_features, layer.rank_k, layer.explore_k, layer.warm_start_decay, layer.sketch.dtype,
               layer.sketch.device, layer.subspace)
        groups.setdefault(key, []).append((index, layer, q_old))
    for (_, _, explore, beta, dtype, _, subspace), members in groups.items():
        group = [layer for _, layer, _ in members]
        k = group[0].principal_k  # the tracked columns of Q (all k but for the unbiased variant)
        basis = torch.stack([torch.cat([layer.Q[:, :k], layer.scouts], dim=1) for layer in group])   # (G, in, t)
        tokens = torch.stack([layer.tokens_step[0] for layer in group]).to(dtype)             # (G,)
        if subspace == "gradient":
            sketch = beta * torch.stack([layer.sketch for layer in group]) \
                + (1 - beta) * blended_sketch(group, basis, [probe_images[id(layer)] for layer in group])
        else:
            sketch = beta * torch.stack([layer.sketch for layer in group]) \
                + (1 - beta) * torch.stack([layer.sketch_step for layer in group]) / tokens.view(-1, 1, 1)
        for layer, count in zip(group, tokens):
            layer.input_energy.mul_(beta).add_((1 - beta) * layer.energy_step[0] / count)
        ritz = basis.mT @ sketch                                        # (G, t, t) ≈ Bᵀ C̄ B
        energies, rotation = torch.linalg.eigh((ritz + ritz.mT) / 2)
        energies, rotation = energies.flip(-1), rotation.flip(-1)       # strongest first
        # column j stays on the side of old column j, so a settled Q does not flip signs
        rotation = rotation * diagonal_signs(rotation).unsqueeze(-2)
        sketch = sketch @ rotation
        if explore > 0:
            # one host-to-device copy per group, not per layer
            sketch[:, :, -1] = torch.stack([layer._fresh_direction() for layer in group]).to(sketch.device, dtype)
        new_basis = orthonormalize(sketch)                              # (G, in, t)
        if explore > 0:
            sketch[:, :, -1] = energies[:, -2:-1].clamp(min=0) * new_basis[:, :, -1]
        for g, (index, layer, q_old) in enumerate(members):
            layer.Q[:, :k].copy_(new_basis[g, :, :k])
            layer.scouts.copy_(new_basis[g, :, k:])
            layer.sketch.copy_(sketch[g])
            # the share of the tracked energy in Q_p: of the inputs', or of the gradient variant's blend (trace 2)
            total = 2.0 if subspace == "gradient" else layer.input_energy.clamp(min=1e-30)
            layer.captured_energy.copy_(energies[g, :k].sum() / total)
            for statistic in (layer.sketch_step, layer.energy_step, layer.tokens_step):
                statistic.zero_()
            layer.num_updates += 1
            layer.counters[1].add_(1)
        redraw(group)
        for index, layer, q_old in members:
            moved[index] = (q_old, layer.Q.clone())
    return moved


def blended_sketch(layers: list[MoleGradLinear], basis: Tensor, probe_images: list[Tensor | None]) -> Tensor:
    """The gradient variant's step sketch (G, in, t): (C / tr C + M / tr M) B, both at unit trace, with
    C = Σ xᵀx the step's input covariance (sketch_step = C B, energy_step = tr C) and M = dWᵀ dW the
    weight gradient's, estimated from the probe image Y = dWᵀ R (R: (out, t), Gaussian) as Y Yᵀ,
    E[Y Yᵀ] = t M: no (out, in) gradient is formed. Without a gradient (None, or all zero) the
    gradient term is 0. basis: B = [Q_p | scouts] (G, in, t)."""
    tiny = torch.finfo(basis.dtype).tiny
    energy = torch.stack([layer.energy_step[0] for layer in layers]).to(basis.dtype).view(-1, 1, 1)
    blend = torch.stack([layer.sketch_step for layer in layers]) / energy.clamp(min=tiny)     # (G, in, t)
    images = torch.stack([torch.zeros_like(layer.sketch_step) if image is None else image.to(basis.dtype)
                          for layer, image in zip(layers, probe_images)])                     # (G, in, t)
    image_energy = images.square().sum(dim=(-2, -1), keepdim=True)                            # tr(Y Yᵀ)
    return blend + images @ (images.mT @ basis) / image_energy.clamp(min=tiny)


@torch.no_grad()
def redraw(layers: list[MoleGradLinear]) -> None:
    """What the variants draw once per update, for layers of one variant and shape group, at their
    current num_updates (_variant_draw: every process draws the same). unbiased: the random part of Q,
    uniform among the random_k-dim subspaces orthogonal to the principal part (a Gaussian with the
    principal part projected out, twice for rounding, then a sign-fixed QR). gradient: the probes R."""
    if not layers or layers[0].subspace == "principal":
        return
    first = layers[0]
    if first.subspace == "unbiased":
        principal = torch.stack([layer.Q[:, :first.principal_k] for layer in layers])          # (G, in, p)
        draws = torch.stack([layer._variant_draw(first.in_features, first.random_k) for layer in layers])
        draws = draws.to(principal.device, principal.dtype)                                    # (G, in, r)
        for _ in range(2):
            draws = draws - principal @ (principal.mT @ draws)
        for layer, part in zip(layers, orthonormalize(draws)):
            layer.Q[:, first.principal_k:].copy_(part)
    else:
        for layer in layers:
            layer.probes.copy_(layer._variant_draw(*layer.probes.shape))


def _read_counters_after_load(layer: MoleGradLinear, incompatible_keys) -> None:
    layer.seed, layer.num_updates = (int(value) for value in layer.counters.tolist())
    layer.grad_factor = None
    if layer.probe_sink is not None:  # the probes are not saved: drawn again from (seed, num_updates)
        layer.probe_sink.grad = None
        redraw([layer])


def subspace_statistics(x: Tensor, xq: Tensor, scouts: Tensor, power_iters: int) -> tuple[Tensor, Tensor]:
    """One micro-batch's contribution to the sketch and the input energy: (xᵀ (x B), ‖x‖²) with
    B = [Q_p | scouts], x: (N, in), xq = x Q_p: (N, p), Q_p the tracked columns of Q (all of them but
    for the unbiased variant); power_iters > 1 applies xᵀx more times."""
    xb = torch.cat([xq, x @ scouts.to(x.dtype)], dim=1)                  # (N, k+e) = x B
    y = x.T @ xb                                                        # (in, k+e) = N · C B
    for _ in range(power_iters - 1):
        basis = orthonormalize(y.to(torch.promote_types(y.dtype, torch.float32))).to(x.dtype)
        y = x.T @ (x @ basis)                                           # N · C orth(y)
    return y, torch.linalg.vector_norm(x, dtype=torch.promote_types(x.dtype, torch.float32)).square()


def _saved_tensors_q_unchanged(ctx) -> tuple[Tensor, ...]:
    """The saved tensors; Q is among them, so autograd's in-place check catches a moved Q."""
    try:
        return ctx.saved_tensors
    except RuntimeError as e:
        raise RuntimeError("MoleGrad: Q changed between forward and backward (update_subspace() ran in "
                           "between); call it once per step, after optimizer.step()") from e


class MoleGradLinearFunction(torch.autograd.Function):
    """y = x Wᵀ saving x Q instead of x; backward gives dX exactly and Gᵀ x Q as the sink's gradient.

    x (..., in); weight (out, in); xq = x Q (N, k) in the compute dtype; Q (in, k), saved only so
    that a Q moved before backward fails; sink (out, k), the leaf whose gradient is the factor.
    The variants (None otherwise): scale (k,), the unbiased variant's column scale of the factor;
    probes R (out, t) and probe_sink (in, t), the gradient variant's: x is kept as well, and backward
    returns xᵀ (G R) as probe_sink's gradient.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, xq: Tensor, q: Tensor, sink: Tensor, scale: Tensor | None = None,
                probes: Tensor | None = None, probe_sink: Tensor | None = None) -> Tensor:
        ctx.save_for_backward(xq, weight, q, scale, probes, x if probes is not None else None)
        ctx.x_dtype = x.dtype
        return F.linear(x.to(xq.dtype), weight.to(xq.dtype))             # (..., out); cast here: no autocast cache

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        xq, weight, _, scale, probes, x = _saved_tensors_q_unchanged(ctx)
        dtype = xq.dtype                    # the compute dtype of the forward
        grad_y = grad_y.to(dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_y @ weight.to(dtype)).to(ctx.x_dtype)        # (..., in), exact
        g2d = grad_y.reshape(-1, grad_y.shape[-1])                      # (N, out)
        acc = torch.promote_types(dtype, torch.float32)
        grad_factor = (g2d.T @ xq).to(acc)                              # (out, k)
        if scale is not None:
            grad_factor = grad_factor * scale.to(acc)
        probe_image = None
        if probes is not None:
            x2d = x.reshape(-1, x.shape[-1]).to(dtype)                  # (N, in)
            probe_image = (x2d.T @ (g2d @ probes.to(dtype))).to(acc)    # (in, t) = dWᵀ R
        return grad_x, None, None, None, grad_factor, None, None, probe_image


class MoleGradMLPFunction(torch.autograd.Function):
    """y = relu²(x W1ᵀ) W2ᵀ with MoleGrad on W1 and W2, saving x Q1, relu²(h) Q2 and either x (h is
    recomputed in backward) or h (keep_h: 4d + 2k values per token instead of d + 2k, no recompute).

    x (N, d) in the compute dtype; w_fc (4d, d), w_proj (d_out, 4d); xq = x Q1 (N, k1); q_fc, q_proj
    saved only for the check that they did not move; the sinks (4d, k1), (d_out, k2) receive the
    factor gradients. With observe, also returns proj's statistics (its input exists only here),
    taken on the first tracked_proj columns of aq. The variants' tensors, None otherwise, as in
    MoleGradLinearFunction: scale_fc, scale_proj (unbiased); probes_fc, probes_proj and their sinks
    (gradient: x is kept under keep_h too, and relu²(h) is recomputed in backward).
    """

    @staticmethod
    def forward(ctx, x: Tensor, w_fc: Tensor, w_proj: Tensor, xq: Tensor, q_fc: Tensor, q_proj: Tensor,
                scouts_proj: Tensor, sink_fc: Tensor, sink_proj: Tensor, keep_h: bool, observe: bool,
                power_iters: int, tracked_proj: int, scale_fc: Tensor | None, scale_proj: Tensor | None,
                probes_fc: Tensor | None, probes_proj: Tensor | None, probe_sink_fc: Tensor | None,
                probe_sink_proj: Tensor | None):
        dtype = x.dtype
        h = x @ w_fc.to(dtype).T                                        # (N, 4d)
        a = F.relu(h).square_()     # (N, 4d); in place: CUDA autocast would run out-of-place pow in fp32
        aq = a @ q_proj.to(dtype)                                       # (N, k2)
        if observe:
            sketch, energy = subspace_statistics(a, aq[:, :tracked_proj], scouts_proj, power_iters)
        else:
            sketch, energy = x.new_zeros(0), x.new_zeros(0)
        x_for_probes = x if keep_h and probes_fc is not None else None
        ctx.save_for_backward(h if keep_h else x, xq, aq, w_fc, w_proj, q_fc, q_proj, scale_fc, scale_proj,
                              probes_fc, probes_proj, x_for_probes)
        ctx.keep_h = keep_h
        ctx.mark_non_differentiable(sketch, energy)
        return a @ w_proj.to(dtype).T, sketch, energy                   # (N, d_out)

    @staticmethod
    def backward(ctx, grad_y: Tensor, _grad_sketch, _grad_energy):
        (x_or_h, xq, aq, w_fc, w_proj, _, _, scale_fc, scale_proj, probes_fc, probes_proj,
         x_for_probes) = _saved_tensors_q_unchanged(ctx)
        dtype = xq.dtype
        g = grad_y.to(dtype)                                            # (N, d_out)
        acc = torch.promote_types(dtype, torch.float32)
        grad_proj = (g.T @ aq).to(acc)                                  # (d_out, k2)
        h = x_or_h if ctx.keep_h else x_or_h @ w_fc.to(dtype).T         # (N, 4d)
        grad_h = (g @ w_proj.to(dtype)).mul_(F.relu(h)).mul_(2)         # (N, 4d)
        grad_fc = (grad_h.T @ xq).to(acc)                               # (4d, k1)
        grad_x = grad_h @ w_fc.to(dtype) if ctx.needs_input_grad[0] else None   # (N, d)
        if scale_fc is not None:
            grad_fc = grad_fc * scale_fc.to(acc)
        if scale_proj is not None:
            grad_proj = grad_proj * scale_proj.to(acc)
        image_fc = image_proj = None
        if probes_proj is not None:
            image_proj = (F.relu(h).square().T @ (g @ probes_proj.to(dtype))).to(acc)    # (4d, t2) = dW2ᵀ R2
        if probes_fc is not None:
            x = x_for_probes if ctx.keep_h else x_or_h
            image_fc = (x.T @ (grad_h @ probes_fc.to(dtype))).to(acc)                     # (d, t1) = dW1ᵀ R1
        return (grad_x, None, None, None, None, None, None, grad_fc, grad_proj, None, None, None,
                None, None, None, None, None, image_fc, image_proj)


def molegrad_mlp(x: Tensor, fc: MoleGradLinear, proj: MoleGradLinear, keep_h: bool = False) -> Tensor:
    """proj(relu²(fc(x))), x: (..., d), output in the compute dtype, saving d + 2k values per token
    (keep_h: 4d + 2k, and backward does not recompute h). In the model, whose RMSNorm before the MLP
    keeps x anyway, that is d + 2k (keep_h: 5d + 2k) against the dense MLP's 5d."""
    if fc.out_features != proj.in_features:
        raise ValueError(f"fc.out_features={fc.out_features} must equal "
                         f"proj.in_features={proj.in_features}")
    dtype = compute_dtype(x.device.type, x.dtype)
    if not (torch.is_grad_enabled() and fc.weight.requires_grad and proj.weight.requires_grad):
        return F.linear(F.relu(F.linear(x.to(dtype), fc.weight.to(dtype))).square_(), proj.weight.to(dtype))
    x2d = x.reshape(-1, x.shape[-1]).to(dtype)                          # (N, d)
    observe = fc.training and fc.observing
    with torch.no_grad():
        xq = x2d @ fc.Q.to(dtype)                                       # (N, k1)
        if observe:
            fc.add_statistics(*subspace_statistics(x2d, xq[:, :fc.principal_k], fc.scouts, fc.power_iters), x2d.shape[0])
    y, sketch, energy = MoleGradMLPFunction.apply(x2d, fc.weight, proj.weight, xq, fc.Q, proj.Q, proj.scouts,
                                                   fc.grad_sink, proj.grad_sink, keep_h, observe, proj.power_iters,
                                                   proj.principal_k, fc.factor_scale, proj.factor_scale, fc.probes,
                                                   proj.probes, fc.probe_sink, proj.probe_sink)
    if observe:
        proj.add_statistics(sketch, energy, x2d.shape[0])
    return y.view(*x.shape[:-1], y.shape[-1])


def molegrad_layers(model: nn.Module) -> list[MoleGradLinear]:
    return [module for module in model.modules() if isinstance(module, MoleGradLinear)]


class MoleGradStep:
    """MoleGrad's part of one optimizer step: the training step's only way in.

    Before the optimizer step, `statistics()` are what several processes sum (all-reduce) so that
    every rank moves its Q alike, and `gradients()` hands over the factor gradients (a MoleGrad
    weight has no .grad) for the clip and the all-reduce. After it, `finish(optimizers)` moves every
    subspace one step (move_subspaces: batched, one host sync, the factor gradients dropped) and
    carries the optimizers' state kept in Q's coordinates along (their `transport_subspace`)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = molegrad_layers(model)

    def statistics(self) -> list[Tensor]:
        return [statistic for layer in self.layers for statistic in layer.step_statistics()]

    def gradients(self) -> dict[int, Tensor]:
        """id(weight) -> its layer's factor gradient (out, k): dW = grad_factor Qᵀ, ‖dW‖ = ‖grad_factor‖."""
        return {id(layer.weight): layer.grad_factor for layer in self.layers if layer.grad_factor is not None}

    @torch.no_grad()
    def finish(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        with full_fp32_matmuls():
            for layer, (q_old, q_new) in zip(self.layers, move_subspaces(self.layers)):
                if q_new is q_old:  # no training forward since the last update: Q did not move
                    continue
                for opt in optimizers:
                    transport = getattr(opt, "transport_subspace", None)
                    if transport is not None:
                        transport(layer, q_old, q_new)


@contextmanager
def full_fp32_matmuls() -> Iterator[None]:
    """fp32 matmuls in full precision inside (no TF32, which training enables on CUDA): the subspace
    math (Rayleigh–Ritz, the momentum transport) keeps its buffers fp32 on purpose, and its
    matrices are small (in x t), so full precision costs nothing."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@contextmanager
def statistics_paused(model: nn.Module) -> Iterator[None]:
    """MoleGrad layers of `model` take no statistics inside (a recompute reruns their forward)."""
    layers = molegrad_layers(model)
    for layer in layers:
        layer.observing = False
    try:
        yield
    finally:
        for layer in layers:
            layer.observing = True
