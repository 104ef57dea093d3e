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

Memory of the MLP y = relu²(x W1ᵀ) W2ᵀ (d → 4d → d), values saved for backward per token, counted
by storage (tests/test_streaming_linear.py::test_mlp_saved_values_per_token, fp32, d=32, k=4):

    dense: nn.Linear, relu().square()         x, relu(h), relu²(h)       9d
    MoleGrad on both linears                  x Q1, relu(h), relu²(h) Q2  4d + 2k
    ... with relu_squared()                   x Q1, h, relu²(h) Q2        4d + 2k
    streaming_mlp(): h recomputed in backward x, x Q1, relu²(h) Q2        d + 2k
    (dense, MLP checkpointed: x only          x                           d, not measured)

ReLU² needs h (or relu(h)) for an exact dX, so compressing W2's input saves nothing unless h is
recomputed; eager relu().square() keeps relu(h) once (two saved tensors, one storage), so
relu_squared() saves no bytes, only a tensor. streaming_mlp() saves about as much as checkpointing
and, counting matmuls of size N·d·4d, runs 2 forward + 3 backward (recompute h, dX through W2 and
W1; the dW matmuls shrink to N·4d·k) against dense 2 + 4 and checkpointed 4 + 4.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def diagonal_signs(matrix: Tensor) -> Tensor:
    """±1 per column: the sign of matrix's diagonal entry, + for 0. (rows, cols) -> (cols,)"""
    return torch.where(torch.diagonal(matrix) < 0, -1.0, 1.0).to(matrix.dtype)


def orthonormalize(matrix: Tensor) -> Tensor:
    """Q of the QR decomposition of matrix (rows, cols), signs fixed so that diag(R) ≥ 0."""
    q, r = torch.linalg.qr(matrix)
    return q * diagonal_signs(r)


# the persistent buffers of a StreamingLinear besides its weight: its subspace and statistics
SUBSPACE_STATE = ("Q", "scouts", "sketch", "input_energy", "captured_energy", "counters")


class StreamingLinear(nn.Module):
    """Drop-in for nn.Linear(in_features, out_features, bias=False) with MoleGrad weight gradients.

    rank_k: directions that compress the input (1 ≤ rank_k ≤ in_features).
    explore_k: scout directions tracked beside them (default min(4, in_features - rank_k)).
    power_iters: applications of the micro-batch covariance per forward (≥ 1).
    warm_start_decay: β of the sketch's running average (0 ≤ β < 1).
    seed: seeds the initial subspace and the fresh directions; give each layer its own.
    """

    def __init__(self, in_features: int, out_features: int, rank_k: int, power_iters: int = 1,
                 warm_start_decay: float = 0.95, explore_k: int | None = None, seed: int = 0):
        super().__init__()
        if not 1 <= rank_k <= in_features:
            raise ValueError(f"rank_k={rank_k}: expected 1 <= rank_k <= in_features={in_features}")
        if explore_k is None:
            explore_k = min(4, in_features - rank_k)
        if not 0 <= explore_k <= in_features - rank_k:
            raise ValueError(f"explore_k={explore_k}: expected 0 <= explore_k <= "
                             f"in_features - rank_k = {in_features - rank_k}")
        if power_iters < 1:
            raise ValueError(f"power_iters={power_iters}: expected >= 1")
        if not 0.0 <= warm_start_decay < 1.0:
            raise ValueError(f"warm_start_decay={warm_start_decay}: expected 0 <= decay < 1")
        self.in_features, self.out_features = in_features, out_features
        self.rank_k, self.explore_k = rank_k, explore_k
        self.power_iters, self.warm_start_decay, self.seed = power_iters, warm_start_decay, seed
        tracked = rank_k + explore_k
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        # persistent: the subspace and its running statistics, for exact resume
        self.register_buffer("Q", torch.empty(in_features, rank_k))           # compresses x
        self.register_buffer("scouts", torch.empty(in_features, explore_k))   # tracked, unused
        self.register_buffer("sketch", torch.empty(in_features, tracked))     # ≈ C̄ [Q | scouts]
        self.register_buffer("input_energy", torch.empty(()))                 # running ‖x‖²/N
        self.register_buffer("captured_energy", torch.empty(()))              # ‖x Q‖² / ‖x‖²
        # [seed, num_updates]: tensors, so that state_dict() holds tensors only; the Python ints
        # self.seed and self.num_updates mirror them (read per forward without a device sync)
        self.register_buffer("counters", torch.zeros(2, dtype=torch.long))
        # this step's statistics: what several processes all-reduce (sum) before an update
        self.register_buffer("sketch_step", torch.empty(in_features, tracked), persistent=False)
        self.register_buffer("energy_step", torch.empty(()), persistent=False)
        self.register_buffer("tokens_step", torch.empty((), dtype=torch.long), persistent=False)
        self.num_updates = 0                     # Q's version, mirrored in counters[1]
        self.grad_factor: Tensor | None = None   # (out, k): dW ≈ grad_factor @ Q.T
        self.register_load_state_dict_post_hook(_read_counters_after_load)
        self.reset_parameters()
        self.reset_subspace()

    def reset_parameters(self) -> None:
        """The weight's init, as nn.Linear does it."""
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    @torch.no_grad()
    def reset_subspace(self) -> None:
        """A random orthonormal subspace from the seed; call it after to_empty() of a meta model."""
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

    def _apply(self, fn, recurse: bool = True):
        """Moves the subspace buffers with the module but never casts them to 16-bit floats.

        model.to(torch.bfloat16) (or .half()) casts only the weight; Q, the sketch and the energies
        stay float32 (float64 casts, as in tests, apply): power iteration and QR in bf16 would
        lose the subspace within a few updates, and resume would not be exact.
        """
        before = {name: buffer for name, buffer in self._buffers.items()
                  if buffer is not None and buffer.is_floating_point()}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype in (torch.float16, torch.bfloat16) and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(x, self.weight)
        return StreamingLinearFunction.apply(x, self.weight, self)

    @torch.no_grad()
    def observe(self, x: Tensor, xq: Tensor) -> None:
        """Adds this micro-batch's statistics; x: (N, in), xq = x Q: (N, k). Training mode only."""
        if not self.training:
            return
        xb = torch.cat([xq, x @ self.scouts.to(x.dtype)], dim=1)        # (N, k+e) = x B
        y = x.T @ xb                                                    # (in, k+e) = N · C B
        for _ in range(self.power_iters - 1):
            basis = orthonormalize(y.to(self.sketch.dtype)).to(x.dtype)
            y = x.T @ (x @ basis)                                       # N · C orth(y)
        self.sketch_step.add_(y)
        self.energy_step.add_(torch.linalg.vector_norm(x).square())
        self.tokens_step.add_(x.shape[0])

    def accumulate_grad_factor(self, gq: Tensor, q_version: int) -> None:
        """Adds gq = Gᵀ x Q: (out, k), computed with Q's version q_version, to grad_factor."""
        if q_version != self.num_updates:
            raise RuntimeError(f"backward uses Q version {q_version} but the layer is at version "
                               f"{self.num_updates}: update_subspace() ran between forward and "
                               f"backward; call it once per step, after optimizer.step()")
        gq = gq.to(torch.promote_types(gq.dtype, torch.float32))
        if self.grad_factor is None:
            self.grad_factor = gq
        else:
            self.grad_factor.add_(gq)

    def step_statistics(self) -> tuple[Tensor, Tensor, Tensor]:
        """The tensors to all-reduce (sum) across processes before update_subspace()."""
        return self.sketch_step, self.energy_step, self.tokens_step

    @torch.no_grad()
    def update_subspace(self) -> tuple[Tensor, Tensor]:
        """Moves Q one power-iteration step towards the inputs' top-k subspace.

        Call once per optimizer step, after optimizer.step(). Returns (Q_old, Q_new), both
        (in, k): state kept in Q's coordinates moves as m_new = m_old (Q_oldᵀ Q_new). Drops
        grad_factor, which is expressed in Q_old. Without training forwards since the last
        update, nothing changes and the same tensor is returned twice (Q_new is Q_old).
        """
        q_old = self.Q.clone()
        if self.sketch.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"subspace buffers are {self.sketch.dtype}: expected float32 or "
                             f"float64; cast only the weight to low precision")
        if self.tokens_step.item() == 0:  # one host sync per layer and step
            return q_old, q_old
        k, beta = self.rank_k, self.warm_start_decay
        basis = torch.cat([self.Q, self.scouts], dim=1)                 # B: (in, k+e)
        tokens = self.tokens_step.to(self.sketch.dtype)
        sketch = beta * self.sketch + (1 - beta) * self.sketch_step / tokens       # ≈ C̄ B
        self.input_energy.mul_(beta).add_((1 - beta) * self.energy_step / tokens)
        ritz = basis.T @ sketch                                         # (k+e, k+e) ≈ Bᵀ C̄ B
        energies, rotation = torch.linalg.eigh((ritz + ritz.T) / 2)
        energies, rotation = energies.flip(0), rotation.flip(1)         # strongest first
        # column j stays on the side of old column j, so a settled Q does not flip signs
        rotation = rotation * diagonal_signs(rotation)
        sketch = sketch @ rotation
        if self.explore_k > 0:
            sketch[:, -1] = self._fresh_direction()
        new_basis = orthonormalize(sketch)                              # (in, k+e)
        if self.explore_k > 0:
            # the fresh direction starts at the energy of the weakest one kept, then earns its place
            sketch[:, -1] = energies[-2].clamp(min=0) * new_basis[:, -1]
        self.Q.copy_(new_basis[:, :k])
        self.scouts.copy_(new_basis[:, k:])
        self.sketch.copy_(sketch)
        self.captured_energy.copy_(energies[:k].sum() / self.input_energy.clamp(min=1e-30))
        for statistic in self.step_statistics():
            statistic.zero_()
        self.num_updates += 1
        self.counters[1].add_(1)
        self.grad_factor = None
        return q_old, self.Q.clone()

    def _fresh_direction(self) -> Tensor:
        """A random (in,) vector, the same in every process: seeded by (seed, num_updates)."""
        generator = torch.Generator().manual_seed(self.seed * 2 ** 32 + self.num_updates)
        direction = torch.randn(self.in_features, generator=generator, device="cpu",
                                dtype=torch.float64)
        return direction.to(self.sketch.device, self.sketch.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank_k={self.rank_k}, explore_k={self.explore_k}, "
                f"power_iters={self.power_iters}, warm_start_decay={self.warm_start_decay}")


def _read_counters_after_load(layer: StreamingLinear, incompatible_keys) -> None:
    layer.seed, layer.num_updates = (int(value) for value in layer.counters.tolist())
    layer.grad_factor = None


class StreamingLinearFunction(torch.autograd.Function):
    """y = x Wᵀ saving x Q instead of x; backward gives dX exactly and adds Gᵀ x Q to the layer."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, layer: StreamingLinear) -> Tensor:
        x2d = x.reshape(-1, x.shape[-1])                                # (N, in)
        xq = x2d @ layer.Q.to(x2d.dtype)                                # (N, k)
        layer.observe(x2d, xq)
        ctx.save_for_backward(xq, weight)
        ctx.layer, ctx.q_version, ctx.x_dtype = layer, layer.num_updates, x.dtype
        return F.linear(x, weight)                                      # (..., out)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        xq, weight = ctx.saved_tensors
        weight = weight.to(grad_y.dtype)   # under autocast the forward ran in grad_y's dtype
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_y @ weight).to(ctx.x_dtype)                  # (..., in), exact
        g2d = grad_y.reshape(-1, grad_y.shape[-1])                      # (N, out)
        ctx.layer.accumulate_grad_factor(g2d.T @ xq.to(g2d.dtype), ctx.q_version)   # (out, k)
        return grad_x, None, None


class ReluSquaredFunction(torch.autograd.Function):
    """relu(h)², saving only h: (..., n)."""

    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        ctx.save_for_backward(h)
        return F.relu(h).square()

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> Tensor:
        (h,) = ctx.saved_tensors
        return grad_out * 2 * F.relu(h)


def relu_squared(h: Tensor) -> Tensor:
    return ReluSquaredFunction.apply(h)


class StreamingMLPFunction(torch.autograd.Function):
    """y = relu²(x W1ᵀ) W2ᵀ with MoleGrad on W1 and W2, saving x, x Q1 and relu²(h) Q2.

    Backward recomputes h = x W1ᵀ, so dX is exact; both weights get factor gradients.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w_fc: Tensor, w_proj: Tensor, fc: StreamingLinear,
                proj: StreamingLinear) -> Tensor:
        x2d = x.reshape(-1, x.shape[-1])                                # (N, d)
        h = F.linear(x2d, w_fc)                                         # (N, 4d)
        a = F.relu(h).square()                                          # (N, 4d)
        xq = x2d @ fc.Q.to(x2d.dtype)                                   # (N, k_fc)
        aq = a @ proj.Q.to(a.dtype)                                     # (N, k_proj)
        fc.observe(x2d, xq)
        proj.observe(a, aq)
        # x as h was computed from it: under autocast the low-precision copy, half the bytes
        ctx.save_for_backward(x2d.to(h.dtype), xq, aq, w_fc, w_proj)
        ctx.layers, ctx.q_versions = (fc, proj), (fc.num_updates, proj.num_updates)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        y = F.linear(a, w_proj)                                         # (N, d_out)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x2d, xq, aq, w_fc, w_proj = ctx.saved_tensors                   # x2d: (N, d)
        (fc, proj), (fc_version, proj_version) = ctx.layers, ctx.q_versions
        dtype = grad_y.dtype               # under autocast the forward ran in grad_y's dtype
        g = grad_y.reshape(-1, grad_y.shape[-1])                        # (N, d_out)
        proj.accumulate_grad_factor(g.T @ aq.to(dtype), proj_version)   # (d_out, k_proj)
        relu_h = F.relu(x2d.to(dtype) @ w_fc.to(dtype).T)               # (N, 4d), recomputed
        grad_h = (g @ w_proj.to(dtype)).mul_(relu_h).mul_(2)            # (N, 4d)
        fc.accumulate_grad_factor(grad_h.T @ xq.to(dtype), fc_version)  # (4d, k_fc)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_h @ w_fc.to(dtype)).view(ctx.x_shape).to(ctx.x_dtype)   # (..., d)
        return grad_x, None, None, None, None


def streaming_mlp(x: Tensor, fc: StreamingLinear, proj: StreamingLinear) -> Tensor:
    """proj(relu²(fc(x))) saving d + 2k values per token instead of 9d; x: (..., d)."""
    if fc.out_features != proj.in_features:
        raise ValueError(f"fc.out_features={fc.out_features} must equal "
                         f"proj.in_features={proj.in_features}")
    if not (torch.is_grad_enabled() and fc.weight.requires_grad and proj.weight.requires_grad):
        return F.linear(F.relu(F.linear(x, fc.weight)).square(), proj.weight)
    return StreamingMLPFunction.apply(x, fc.weight, proj.weight, fc, proj)


def streaming_layers(model: nn.Module) -> list[StreamingLinear]:
    return [module for module in model.modules() if isinstance(module, StreamingLinear)]


def dense_grad(layer: StreamingLinear) -> Tensor | None:
    """grad_factor @ Qᵀ: (out, in). Materialises the dense gradient: for tests and references."""
    if layer.grad_factor is None:
        return None
    return layer.grad_factor @ layer.Q.to(layer.grad_factor.dtype).T


def factor_grad_norm_sq(layer: StreamingLinear) -> Tensor:
    """‖grad_factor Qᵀ‖² = ‖grad_factor‖², since Q has orthonormal columns."""
    if layer.grad_factor is None:
        return torch.zeros((), device=layer.weight.device)
    return layer.grad_factor.square().sum()


def zero_factor_grad(model: nn.Module) -> None:
    for layer in streaming_layers(model):
        layer.grad_factor = None
