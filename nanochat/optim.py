"""Optimizers and the learning-rate schedule.

Muon for the 2-D matrices of the blocks (momentum, then Newton–Schulz orthogonalisation), AdamW
(torch.optim.AdamW's update) for the embedding and the LM head; see `setup_optimizers`. The
schedule functions here are the only ones the training scripts use.

Recipe options (upstream nanochat's 2026 Muon, all off by default; docs/recipe.md): Polar Express
instead of the fixed Newton–Schulz quintic, NorMuon variance reduction, cautious weight decay, and
weight decay scaled by 1/width² (setup_optimizers).

Precision (nanochat/precision.py, setup_optimizers' param_dtype, grad_dtype, optim_state; all off
by default): both optimizers update a bf16 weight on an fp32 copy and round it back stochastically
(`PrecisionStep`), read gradients through precision.gradient (p.grad or its fp32 accumulation
buffer), and keep their states fp32 or 8-bit (Muon's momentum, dense or low-rank, and AdamW's two
moments) through precision.OptimizerStates.

Muon reads each dense gradient through `Muon._gradient(p)` and applies it through
`Muon._update(p, grad, group)`. A MoleGrad matrix (a MoleGradLinear's weight, passed as
`molegrad=`) has no p.grad: Muon reads the layer's factor gradient gq (out, k) and basis Q
(in, k), dW ≈ gq Qᵀ, and never forms that product as a separate tensor:

    dense momentum (default)   buf ← μ buf + (1-μ) gq Qᵀ             one addmm into (out, in)
                               update = μ buf + (1-μ) gq Qᵀ          one addmm (Nesterov), then
                               W ← W - lr s NS(update)               Newton–Schulz as for dense
    low-rank momentum          m ← μ m + (1-μ) gq                    (out, k): no (out, in) state
                               W ← W - lr s r NS(μ m + (1-μ) gq) Qᵀ  NS of an (out, k) matrix,
                                                                     r = lowrank_step_scale

Low-rank step size (lowrank_step_rule): NS(m) has min(out, k) singular values near 1 where a
dense update has min(out, in), so at equal lr its Frobenius norm is √(min(out, k) / min(out, in))
of dense Muon's (0.16 at k = 32, in = out = 1280). "dense_norm" (the default) takes r =
√(min(out, in) / min(out, k)), restoring the dense Frobenius norm, so --matrix_lr means the same
step length with and without low-rank momentum (r = 1 at k = in); "unit" takes r = 1 (the dense
step's spectral norm). Measured (bench/molegrad_quality.py, k/in = 1/43): with the MLP Linears
compressed, dense_norm's best lr is dense Muon's 0.02; with every Linear compressed (the
flagship) it is 8x lower and quality is lost whatever the lr: the attention Linears, not the rule.

NS is an odd matrix polynomial after a Frobenius normalisation, so NS(m Qᵀ) = NS(m) Qᵀ for Q
with orthonormal columns: the low-rank update is the dense one of the momentum's image m Qᵀ.
When Q moves (molegrad.MoleGradStep.finish, after the step), m moves to m (Q_oldᵀ Q_new): its image
becomes the projection of the old image onto the new subspace, the best a rank-k state can keep.
The dense momentum needs no transport; it keeps what the old subspaces contributed. AdamW
(torch's, plus sharding) never sees a MoleGrad weight: setup_optimizers gives it only wte and
lm_head, which are never compressed, so no AdamW moments need to live in a subspace.

Several processes (`sharded`, on by default when a process group of more than one rank is up):
Muon and AdamW shard their work and state ZeRO-style, by whole parameters (Newton–Schulz needs the
whole matrix). Each parameter has an owner rank (`assign_owners`: largest first, round-robin);
`reduce_gradients()` averages every gradient onto its owner and the other ranks drop theirs; the
owner alone updates the parameter and keeps its momentum / Adam moments, then broadcasts the new
values. A MoleGrad matrix is the exception: only its factor gradient (out, k) is all-reduced and
every rank applies the same update, because broadcasting the updated (out, in) weight would cost as
much as a dense gradient. Its momentum is therefore replicated: (out, k) with lowrank momentum,
(out, in) with dense momentum. Bytes each rank sends per step (nanochat.distributed's ring model,
w ranks): 2(w-1)/w · (dense parameters + MoleGrad factors), the same as DDP's all-reduce for the
dense ones; trainer.reduce_across_ranks adds the subspace statistics (in, k+e) per MoleGrad layer.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from nanochat import distributed
from nanochat.common import resolve_dtype
from nanochat.molegrad import MOLEGRAD_MOMENTA, MoleGradLinear, molegrad_layers
from nanochat.precision import OptimizerStates, StochasticRounding, drop_gradients, gradient, prepare_parameters

# Quintic Newton–Schulz coefficients (Keller Jordan's Muon): they maximise the slope at 0, so
# small singular values grow fast; after 5 steps singular values land in roughly [0.7, 1.2]
# instead of exactly 1, which is as good for the update and much cheaper than an SVD.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932): one quintic (a, b, c) per
# step, each the minimax-optimal odd polynomial for the interval the singular values are known to
# lie in after the previous steps (5 steps, safety factor 2e-2, cushion 2, as upstream nanochat).
# After 5 steps the singular values sit much closer to 1 than the fixed coefficients leave them.
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
ORTHOGONALIZERS = ("newton_schulz", "polar_express")
# setup_optimizers' width-scaled weight decay: wd x (WEIGHT_DECAY_REF_WIDTH / n_embd)², upstream's
# fit over d8-d20 (optimal Muon weight decay ∝ 1/width², tuned at width 768).
WEIGHT_DECAY_REF_WIDTH = 768


def zeropower_via_newtonschulz5(grad: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately U Vᵀ for grad = U S Vᵀ (2-D), computed in `dtype`.

    Iterates on the wide orientation (rows <= cols) so that X Xᵀ is the smaller Gram matrix.
    """
    if grad.ndim != 2:
        raise ValueError(f"zeropower_via_newtonschulz5: expected a 2-D matrix, got shape {tuple(grad.shape)}")
    a, b, c = NS_COEFFICIENTS
    x = grad.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.t()
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.t()  # (rows, rows)
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A²
        x = torch.addmm(x, poly, x, beta=a)  # a X + (b A + c A²) X
    return x.t() if tall else x


def zeropower_via_polar_express(grad: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately U Vᵀ for grad = U S Vᵀ (2-D) by Polar Express: step i applies the quintic of
    POLAR_EXPRESS_COEFFICIENTS[i] (steps <= 5). Scaled to Frobenius norm 1/1.01 first, the margin
    the coefficients were computed with."""
    if grad.ndim != 2:
        raise ValueError(f"zeropower_via_polar_express: expected a 2-D matrix, got shape {tuple(grad.shape)}")
    if not 1 <= steps <= len(POLAR_EXPRESS_COEFFICIENTS):
        raise ValueError(f"zeropower_via_polar_express: expected 1 <= steps <= {len(POLAR_EXPRESS_COEFFICIENTS)} "
                         f"(one coefficient triple per step), got {steps}")
    x = grad.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.t()
    x = x / (x.norm() * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFICIENTS[:steps]:
        gram = x @ x.t()  # (rows, rows)
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A²
        x = torch.addmm(x, poly, x, beta=a)  # a X + (b A + c A²) X
    return x.t() if tall else x


def normuon_variance_step(ortho: torch.Tensor, variance: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon's variance reduction (arXiv 2510.05491, as upstream nanochat) of an orthogonalised
    update `ortho` (rows, cols), in `variance`'s dtype (float32, or wider): `variance` (rows, 1) if
    rows >= cols else (1, cols) keeps an EMA (beta2) of the mean square of each row (column); the
    update is divided by its root and then rescaled to the Frobenius norm it had. `variance` is
    updated in place."""
    o = ortho.to(variance.dtype)
    reduce_dim = -1 if o.size(0) >= o.size(1) else -2
    mean_square = o.square().mean(dim=reduce_dim, keepdim=True)  # (rows, 1) or (1, cols)
    variance.lerp_(mean_square, 1 - beta2)
    scale = variance.clamp_min(1e-10).rsqrt()
    norm_before = mean_square.sum().mul(o.size(reduce_dim)).sqrt()
    norm_after = (mean_square * scale.square()).sum().mul(o.size(reduce_dim)).sqrt()
    return o * (scale * (norm_before / norm_after.clamp_min(1e-10)))


LOWRANK_STEP_RULES = ("dense_norm", "unit")


def lowrank_step_scale(out_features: int, in_features: int, rank_k: int, rule: str = "dense_norm") -> float:
    """The low-rank update's step multiplier r (module docstring): √(min(out, in) / min(out, k))
    ("dense_norm": the Frobenius norm of a dense Muon update), or 1 ("unit")."""
    if rule == "unit":
        return 1.0
    return (min(out_features, in_features) / min(out_features, rank_k)) ** 0.5


def assign_owners(params: list[torch.Tensor], world_size: int) -> list[int]:
    """The rank that updates each parameter: largest first, dealt round-robin, so that every rank
    gets about the same number of values and Newton–Schulz FLOPs. Ties keep the given order, so
    every rank computes the same assignment."""
    order = sorted(range(len(params)), key=lambda i: -params[i].numel())
    owners = [0] * len(params)
    for position, index in enumerate(order):
        owners[index] = position % world_size
    return owners


class ShardedStep:
    """ZeRO-style sharding by whole parameters (module docstring), mixed into Muon and AdamW.

    Once per step, in this order (trainer.train_step; step() reduces by itself if nobody did):
        reduce_gradients()   averaged gradients land on their owners, other ranks drop theirs;
                             replicated ones (MoleGrad factors) are all-reduced
        gradient_shards()    the averaged gradients this rank owns: each one is on one rank only
        step()               the owners update their parameters and broadcast them
    """

    def _init_sharding(self, sharded: bool | None, replicated: Iterable[int] = ()) -> None:
        """sharded: None = when a process group of more than one rank is up. replicated: ids of
        parameters that every rank updates from all-reduced gradients (never owned or broadcast)."""
        self.world_size, self.rank = distributed.world_size(), distributed.rank()
        self.sharded = self.world_size > 1 if sharded is None else sharded
        if self.sharded and self.world_size == 1:
            raise ValueError(f"{type(self).__name__}: sharded=True needs a process group of more than one rank")
        skip = set(replicated)
        params = [p for group in self.param_groups for p in group["params"] if id(p) not in skip]
        self.owner = {id(p): owner for p, owner in zip(params, assign_owners(params, self.world_size))}
        self._reduced: list[torch.Tensor] | None = None  # parameters whose gradients this step reduced

    def _replicated_gradients(self) -> list[tuple[str, torch.Tensor]]:
        """(tag, gradient) that every rank needs whole; all-reduced (averaged) by reduce_gradients()."""
        return []

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        params = [p for group in self.param_groups for p in group["params"] if id(p) in self.owner and gradient(p) is not None]
        pending = [distributed.reduce(gradient(p), self.owner[id(p)], "gradient", op=distributed.AVG) for p in params]
        pending += [distributed.all_reduce(grad, tag, op=distributed.AVG) for tag, grad in self._replicated_gradients()]
        distributed.wait_all(pending)
        drop_gradients(p for p in params if self.owner[id(p)] != self.rank)  # the owner holds the average; these are stale
        self._reduced = params

    def gradient_shards(self) -> list[torch.Tensor]:
        """After reduce_gradients(): the averaged gradients of the parameters this rank owns."""
        return [gradient(p) for p in self._reduced or () if gradient(p) is not None]

    @torch.no_grad()
    def _broadcast_updated(self) -> None:
        pending = [distributed.broadcast(p, self.owner[id(p)], "parameter") for p in self._reduced or ()]
        distributed.wait_all(pending)
        self._reduced = None


class PrecisionStep:
    """bf16 weights and the states' representation (nanochat.precision), mixed into Muon and AdamW:
    an update writes `_working(p)` (p itself, or an fp32 copy of a bf16 p) and `_commit(p, w)`
    rounds that copy back stochastically; states go through `self.states` (fp32 or 8-bit)."""

    def _init_precision(self, optim_state: str, seed: int) -> None:
        self.states = OptimizerStates(optim_state)
        self.rounding = StochasticRounding(seed, type(self).__name__)
        params = [p for group in self.param_groups for p in group["params"]]
        self._param_index = {id(p): index for index, p in enumerate(params)}

    @staticmethod
    def _working(p: torch.Tensor) -> torch.Tensor:
        return p.float() if p.dtype == torch.bfloat16 else p

    def _rounding_step(self, p: torch.Tensor) -> int:
        """p's update count, advanced (kept in the state, so that a resumed run draws the same bits)."""
        state = self.state[p]
        state["sr_step"] = state.get("sr_step", 0) + 1
        return state["sr_step"]

    def _commit(self, p: torch.Tensor, working: torch.Tensor) -> None:
        """p <- working, stochastically rounded (random bits of p's index and update count)."""
        if working is not p:
            self.rounding.round_into(p, working, self._param_index[id(p)], self._rounding_step(p))

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, then every floating-point state tensor in its saved dtype: torch casts them
        to their parameter's dtype, which would round fp32 states and 8-bit scales of bf16 weights."""
        super().load_state_dict(state_dict)
        saved_ids = [index for group in state_dict["param_groups"] for index in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for index, p in zip(saved_ids, params):
            for name, value in state_dict["state"].get(index, {}).items():
                if torch.is_tensor(value) and value.is_floating_point() and name != "step":
                    self.state[p][name] = value.to(p.device)


def check_recipe_options(orthogonalizer: str, ns_steps: int, normuon: bool, normuon_beta2: float,
                         cautious_weight_decay: bool, molegrad_momentum: str) -> None:
    """The value checks of Muon's recipe options, for Muon and for the training flags alike: a
    ValueError names the option as the flags spell it ("normuon_beta2=1.5: expected ...")."""
    if orthogonalizer not in ORTHOGONALIZERS:
        raise ValueError(f"muon_orthogonalizer={orthogonalizer!r}: expected one of {'|'.join(ORTHOGONALIZERS)}")
    if orthogonalizer == "polar_express" and ns_steps > len(POLAR_EXPRESS_COEFFICIENTS):
        raise ValueError(f"muon_orthogonalizer=polar_express: has {len(POLAR_EXPRESS_COEFFICIENTS)} steps, "
                         f"got ns_steps={ns_steps}")
    if not 0.0 <= normuon_beta2 < 1.0:
        raise ValueError(f"normuon_beta2={normuon_beta2}: expected a value in [0, 1)")
    if molegrad_momentum == "lowrank" and (normuon or cautious_weight_decay):
        name = "normuon" if normuon else "cautious_weight_decay"
        raise ValueError(f"{name}=True: needs the dense update of every matrix; low-rank MoleGrad momentum "
                         f"(--molegrad_momentum=lowrank, or a --memory_mode) never forms it: use --molegrad_momentum=dense")


class Muon(ShardedStep, PrecisionStep, torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton–Schulz, for 2-D parameters.

    Per matrix: buf ← momentum·buf + (1 − momentum)·g; update = lerp(g, buf, momentum) (Nesterov)
    or buf; O = NewtonSchulz(update); W ← W·(1 − lr·weight_decay) − lr·sqrt(max(1, rows/cols))·O.
    The sqrt(rows/cols) factor keeps the per-element update RMS comparable between square and
    tall matrices.

    Newton–Schulz runs in bf16 on CUDA and on CPUs with native bf16 (4x the fp32 matmul rate on
    the AVX-512 BF16 machines measured in docs/cpu_notes.md; the iteration is insensitive to rounding)
    and in float32 elsewhere: `common.resolve_dtype(device_type)`. `ns_dtype` overrides.

    molegrad: MoleGrad layers whose weights are among `params`; their updates come from the
    factor gradients (module docstring), with `molegrad_momentum` dense or lowrank.

    Recipe options (all off by default; off, the step is the one above):
    orthogonalizer "polar_express": Polar Express instead of the fixed Newton–Schulz quintic.
    normuon: NorMuon variance reduction after the orthogonalisation (`normuon_variance_step`, state
    (rows, 1) or (1, cols) per matrix). cautious_weight_decay: decay only the entries where the
    update O and W have the same sign (O·W >= 0: the step already moves W toward 0), arXiv
    2411.16085. Neither of the last two runs with low-rank MoleGrad momentum, whose update is never
    formed as a dense matrix.

    sharded: each rank updates the dense matrices it owns (ShardedStep); None = when a process
    group of more than one rank is up.

    Precision (nanochat.precision): a bf16 matrix is updated in fp32 and rounded back
    stochastically (random bits from `seed`); optim_state "int8" keeps the momentum (dense or
    low-rank) 8-bit.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, weight_decay: float = 0.0,
                 ns_dtype: torch.dtype | None = None, molegrad: Iterable[MoleGradLinear] = (),
                 molegrad_momentum: str = "dense", sharded: bool | None = None,
                 orthogonalizer: str = "newton_schulz", normuon: bool = False, normuon_beta2: float = 0.9,
                 cautious_weight_decay: bool = False, lowrank_step_rule: str = "dense_norm",
                 optim_state: str = "float32", seed: int = 0) -> None:
        if lr < 0:
            raise ValueError(f"Muon lr: expected >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon momentum: expected a value in [0, 1), got {momentum}")
        if ns_steps < 1:
            raise ValueError(f"Muon ns_steps: expected >= 1, got {ns_steps}")
        if weight_decay < 0:
            raise ValueError(f"Muon weight_decay: expected >= 0, got {weight_decay}")
        if molegrad_momentum not in MOLEGRAD_MOMENTA:
            raise ValueError(f"Muon molegrad_momentum: expected one of {'|'.join(MOLEGRAD_MOMENTA)}, "
                             f"got {molegrad_momentum!r}")
        if lowrank_step_rule not in LOWRANK_STEP_RULES:
            raise ValueError(f"Muon lowrank_step_rule: expected one of {'|'.join(LOWRANK_STEP_RULES)}, got {lowrank_step_rule!r}")
        molegrad = list(molegrad)
        check_recipe_options(orthogonalizer, ns_steps, normuon, normuon_beta2, cautious_weight_decay,
                             molegrad_momentum if molegrad else "dense")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay,
                        molegrad_momentum=molegrad_momentum, orthogonalizer=orthogonalizer, normuon=normuon,
                        normuon_beta2=normuon_beta2, cautious_weight_decay=cautious_weight_decay,
                        lowrank_step_rule=lowrank_step_rule)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon: expected 2-D parameters, got one of shape {tuple(p.shape)}")
        self.ns_dtype = ns_dtype
        self._ns_dtypes: dict[str, torch.dtype] = {}
        self.molegrad: dict[int, MoleGradLinear] = {id(layer.weight): layer for layer in molegrad}
        own = {id(p) for group in self.param_groups for p in group["params"]}
        if not set(self.molegrad) <= own:
            raise ValueError("Muon: every MoleGrad layer's weight must be one of the parameters")
        self._init_sharding(sharded, replicated=self.molegrad)
        self._init_precision(optim_state, seed)

    def _replicated_gradients(self) -> list[tuple[str, torch.Tensor]]:
        return [("molegrad factor", layer.grad_factor) for layer in self.molegrad.values()
                if layer.grad_factor is not None]

    def _newton_schulz_dtype(self, device: torch.device) -> torch.dtype:
        if self.ns_dtype is not None:
            return self.ns_dtype
        if device.type not in self._ns_dtypes:
            self._ns_dtypes[device.type] = resolve_dtype(device.type)
        return self._ns_dtypes[device.type]

    def _gradient(self, p: torch.Tensor) -> torch.Tensor | None:
        """The gradient Muon uses for p (None = skip p this step). Override to supply it another way."""
        return gradient(p)

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        """Momentum, orthogonalisation and the weight update of one matrix."""
        state, momentum = self.state[p], group["momentum"]
        buf = self.states.load(state, "momentum_buffer", p)                         # (out, in), fp32 or wider
        grad = grad.to(buf.dtype)
        buf.lerp_(grad, 1 - momentum)
        update = grad.lerp(buf, momentum) if group["nesterov"] else buf
        self.states.store(state, "momentum_buffer", buf)
        ortho = self._recipe_update(p, self._orthogonalise(update, group), group)
        weight = self._working(p)
        weight.add_(ortho, alpha=self._decay_and_step_size(weight, group, ortho))
        self._commit(p, weight)

    def _update_molegrad(self, p: torch.Tensor, layer: MoleGradLinear, group: dict) -> None:
        """The step of a MoleGrad matrix from its factor gradient gq (out, k) and basis Q (in, k)."""
        if p.grad is not None:
            raise RuntimeError(f"Muon: the MoleGrad weight of shape {tuple(p.shape)} has a dense .grad; "
                               f"its gradient must come only from the layer's grad_factor")
        state, momentum = self.state[p], group["momentum"]
        weight = self._working(p)
        if group["molegrad_momentum"] == "lowrank":
            factor = layer.grad_factor                                               # (out, k)
            buf = self.states.load(state, "momentum_factor", factor)                 # (out, k)
            buf.lerp_(factor, 1 - momentum)
            update = factor.lerp(buf, momentum) if group["nesterov"] else buf
            self.states.store(state, "momentum_factor", buf)
            ortho = self._orthogonalise(update, group).to(weight.dtype)              # (out, k)
            step_size = self._decay_and_step_size(weight, group) * lowrank_step_scale(*p.shape, layer.rank_k, group.get("lowrank_step_rule", "dense_norm"))
            weight.addmm_(ortho, layer.Q.to(weight.dtype).T, alpha=step_size)        # W += c s NS(m) Qᵀ
            self._commit(p, weight)
            return
        buf = self.states.load(state, "momentum_buffer", p)                          # (out, in)
        factor, basis_t = layer.grad_factor.to(buf.dtype), layer.Q.to(buf.dtype).T   # (out, k), (k, in)
        buf.mul_(momentum).addmm_(factor, basis_t, alpha=1 - momentum)
        update = torch.addmm(buf, factor, basis_t, beta=momentum, alpha=1 - momentum) if group["nesterov"] else buf
        self.states.store(state, "momentum_buffer", buf)
        ortho = self._recipe_update(p, self._orthogonalise(update, group), group)
        weight.add_(ortho, alpha=self._decay_and_step_size(weight, group, ortho))
        self._commit(p, weight)

    def _orthogonalise(self, update: torch.Tensor, group: dict) -> torch.Tensor:
        orthogonalise = zeropower_via_polar_express if group["orthogonalizer"] == "polar_express" else zeropower_via_newtonschulz5
        return orthogonalise(update, group["ns_steps"], self._newton_schulz_dtype(update.device))

    def _recipe_update(self, p: torch.Tensor, ortho: torch.Tensor, group: dict) -> torch.Tensor:
        """The orthogonalised update of a dense (out, in) step, after NorMuon if that is on."""
        if not group["normuon"]:
            return ortho
        state = self.state[p]
        if "normuon_variance" not in state:
            rows, cols = ortho.shape
            state["normuon_variance"] = torch.zeros((rows, 1) if rows >= cols else (1, cols), device=ortho.device,
                                                    dtype=torch.promote_types(p.dtype, torch.float32))
        return normuon_variance_step(ortho, state["normuon_variance"], group["normuon_beta2"])

    @staticmethod
    def _decay_and_step_size(p: torch.Tensor, group: dict, ortho: torch.Tensor | None = None) -> float:
        """Applies decoupled weight decay to p (the dense weight, MoleGrad or not) and returns the
        step's coefficient: W ← W (1 - lr wd) + coefficient · O, coefficient = -lr sqrt(max(1, rows/cols)).
        Cautious (the group's cautious_weight_decay, needs the dense update `ortho`): only where O·W >= 0."""
        lr = group["lr"]
        if group["weight_decay"] > 0:
            if group["cautious_weight_decay"]:
                same_sign = (ortho * p >= 0).to(p.dtype)
                p.addcmul_(p, same_sign, value=-lr * group["weight_decay"])
            else:
                p.mul_(1 - lr * group["weight_decay"])
        return -lr * max(1.0, p.size(0) / p.size(1)) ** 0.5

    @torch.no_grad()
    def transport_subspace(self, layer: MoleGradLinear, q_old: torch.Tensor, q_new: torch.Tensor) -> None:
        """Q of `layer` moved from q_old to q_new (in, k): low-rank momentum m ← m (Q_oldᵀ Q_new)."""
        state = self.state.get(layer.weight)
        if state and self.states.holds(state, "momentum_factor"):
            buf = self.states.load(state, "momentum_factor", layer.grad_sink)       # (out, k)
            self.states.store(state, "momentum_factor", buf @ (q_old.T @ q_new).to(buf.dtype))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.sharded and self._reduced is None:
            self.reduce_gradients()
        for group in self.param_groups:
            for p in group["params"]:
                layer = self.molegrad.get(id(p))
                if layer is not None:
                    if layer.grad_factor is not None:
                        self._update_molegrad(p, layer, group)
                    continue
                grad = self._gradient(p)  # sharded: None unless this rank owns p
                if grad is not None:
                    self._update(p, grad, group)
        if self.sharded:
            self._broadcast_updated()
        return loss


class AdamW(ShardedStep, PrecisionStep, torch.optim.AdamW):
    """torch.optim.AdamW; `sharded` (None = when a process group of more than one rank is up):
    each rank keeps the moments of, and updates, only the parameters it owns (ShardedStep).

    With bf16 weights or 8-bit states (nanochat.precision) `own_loop` runs instead of torch's: the
    same update, op for op (torch's single-tensor AdamW), one span of at most precision.SPAN values
    of one parameter at a time (so that an embedding's transients stay small), on a working fp32
    copy rounded back stochastically (random bits from `seed`), its moments loaded from and stored
    back to `states`."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], *args, sharded: bool | None = None,
                 optim_state: str = "float32", seed: int = 0, **kwargs) -> None:
        super().__init__(params, *args, **kwargs)
        self._init_sharding(sharded)
        self._init_precision(optim_state, seed)
        self.own_loop = self.states.quantized or any(p.dtype == torch.bfloat16 for group in self.param_groups
                                                     for p in group["params"])

    def step(self, closure=None):
        if not (self.sharded or self.own_loop):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.sharded and self._reduced is None:
            self.reduce_gradients()
        if self.own_loop:
            self._step_each()
        else:
            super().step()  # torch skips parameters without a gradient: those other ranks own
        if self.sharded:
            self._broadcast_updated()
        return loss

    @torch.no_grad()
    def _step_each(self) -> None:
        for group in self.param_groups:
            (beta1, beta2), lr, eps, weight_decay = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                grad = gradient(p)  # sharded: None unless this rank owns p
                if grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                state["step"] += 1
                step = state["step"].item()
                rounding_step = self._rounding_step(p) if p.dtype == torch.bfloat16 else 0
                for part, span in enumerate(self.states.spans(p.numel())):
                    target = p.view(-1)[span[0]:span[1]]
                    weight = self._working(target)
                    g = grad.reshape(-1)[span[0]:span[1]].to(weight.dtype)
                    exp_avg = self.states.load(state, "exp_avg", p, span=span)
                    exp_avg_sq = self.states.load(state, "exp_avg_sq", p, signed=False, span=span)
                    if weight_decay != 0:
                        weight.mul_(1 - lr * weight_decay)
                    exp_avg.lerp_(g, 1 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
                    weight.addcdiv_(exp_avg, denom, value=-(lr / (1 - beta1 ** step)))
                    self.states.store(state, "exp_avg", exp_avg, span=span)
                    self.states.store(state, "exp_avg_sq", exp_avg_sq, signed=False, span=span)
                    if weight is not target:
                        self.rounding.round_into(target, weight, self._param_index[id(p)], rounding_step, part)


def setup_optimizers(model: nn.Module, unembedding_lr: float = 0.004, embedding_lr: float = 0.2,
                     matrix_lr: float = 0.02, weight_decay: float = 0.0,
                     adam_betas: tuple[float, float] = (0.8, 0.95), scalar_lr: float = 0.5,
                     orthogonalizer: str = "newton_schulz", normuon: bool = False, normuon_beta2: float = 0.9,
                     cautious_weight_decay: bool = False, weight_decay_by_width: bool = False,
                     lowrank_step_rule: str = "dense_norm", param_dtype: str = "float32", grad_dtype: str = "auto",
                     optim_state: str = "float32", seed: int = 0) -> list[torch.optim.Optimizer]:
    """[AdamW(lm_head, wte, recipe pieces), Muon(every matrix of the blocks)] for a GPT, each group with `initial_lr`.

    AdamW LRs scale as (n_embd / 768)^-0.5 (tuned at width 768, as nanochat); Muon's update is
    already normalised per matrix. weight_decay is decoupled and applies to the Muon matrices
    only: the embedding and head rows are RMS-normed / softcapped and get none.
    weight_decay_by_width: weight_decay x (768 / n_embd)² (WEIGHT_DECAY_REF_WIDTH).
    orthogonalizer, normuon, normuon_beta2, cautious_weight_decay: Muon's recipe options.
    lowrank_step_rule: Muon's step multiplier for low-rank momentum (LOWRANK_STEP_RULES).

    Precision (nanochat.precision; the defaults leave the model and the updates as they are):
    param_dtype "bfloat16" casts the model's parameters to bf16 here, since the update rule
    (stochastic rounding, no fp32 copy) and the weights' dtype are one decision; grad_dtype
    "float32" then sums micro-batch gradients in fp32 buffers; optim_state "int8" keeps Muon's
    momentum and AdamW's moments 8-bit. seed: the stochastic rounding's random bits (the run's --seed).

    The GPT's recipe pieces, when on, get AdamW groups as upstream nanochat gives them: value
    embeddings at embedding_lr / 2 (betas 0.8, 0.995), resid_lambdas at scalar_lr / 100, x0_lambdas at
    scalar_lr (betas 0.96, 0.95), smear gate and backout at 0.2; the value-embedding gates (ve_gate,
    inside the blocks) are Muon matrices. Every parameter lands in exactly one group.

    MoleGrad: every MoleGradLinear is a block matrix, so Muon takes its factor gradients
    (model.config.molegrad_momentum picks dense or low-rank momentum). AdamW holds only wte,
    lm_head and the recipe pieces, which are never compressed (an embedding's gradient is already
    sparse in rows, and the head's input is kept by the chunked loss anyway), so AdamW needs no
    moments in a subspace; a MoleGradLinear reaching it is an error.
    """
    blocks, lm_head, wte = model.transformer.h, model.lm_head, model.transformer.wte
    prepare_parameters(model, param_dtype, grad_dtype)
    for name, p in blocks.named_parameters():
        if p.ndim != 2:
            raise ValueError(f"setup_optimizers: block parameter {name} has shape {tuple(p.shape)}; Muon takes "
                             f"only 2-D matrices, so give it an AdamW group here")
    dmodel_lr_scale = (model.config.n_embd / 768) ** -0.5
    adam_groups = [
        {"params": [lm_head.weight], "lr": unembedding_lr * dmodel_lr_scale},
        {"params": [wte.weight], "lr": embedding_lr * dmodel_lr_scale},
    ]
    adam_groups += recipe_adam_groups(model, embedding_lr * dmodel_lr_scale, scalar_lr)
    compressed = molegrad_layers(model)
    adam_params = {id(p) for group in adam_groups for p in group["params"]}
    if any(id(layer.weight) in adam_params for layer in compressed):
        raise ValueError("setup_optimizers: a MoleGrad layer's weight is in an AdamW group; AdamW reads only p.grad")
    grouped = [id(p) for p in blocks.parameters()] + [id(p) for group in adam_groups for p in group["params"]]
    missing = [name for name, p in model.named_parameters() if id(p) not in set(grouped)]
    if missing or len(grouped) != len(set(grouped)):
        raise ValueError(f"setup_optimizers: every parameter must be in exactly one group; ungrouped: {missing}")
    if weight_decay_by_width:
        weight_decay *= (WEIGHT_DECAY_REF_WIDTH / model.config.n_embd) ** 2
    fused = lm_head.weight.device.type == "cuda"
    adamw = AdamW(adam_groups, betas=adam_betas, eps=1e-10, weight_decay=0.0, fused=fused, optim_state=optim_state, seed=seed)
    muon = Muon(list(blocks.parameters()), lr=matrix_lr, momentum=0.95, weight_decay=weight_decay,
                molegrad=compressed, molegrad_momentum=model.config.molegrad_momentum,
                orthogonalizer=orthogonalizer, normuon=normuon, normuon_beta2=normuon_beta2,
                cautious_weight_decay=cautious_weight_decay, lowrank_step_rule=lowrank_step_rule,
                optim_state=optim_state, seed=seed)
    optimizers: list[torch.optim.Optimizer] = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def recipe_adam_groups(model: nn.Module, embedding_lr: float, scalar_lr: float) -> list[dict]:
    """AdamW groups of the GPT's recipe pieces that are on (setup_optimizers); none when all are off."""
    groups = []
    if getattr(model, "value_embeds", None) is not None:
        groups.append({"params": list(model.value_embeds.parameters()), "lr": embedding_lr * 0.5, "betas": (0.8, 0.995)})
    if getattr(model, "resid_lambdas", None) is not None:
        groups.append({"params": [model.resid_lambdas], "lr": scalar_lr * 0.01})
        groups.append({"params": [model.x0_lambdas], "lr": scalar_lr, "betas": (0.96, 0.95)})
    gates = [model.smear_gate.weight, model.smear_lambda] if getattr(model, "smear_gate", None) is not None else []
    if getattr(model, "backout_lambda", None) is not None:
        gates.append(model.backout_lambda)
    if gates:
        groups.append({"params": gates, "lr": 0.2})
    return groups


# ---------------------------------------------------------------------------------------------
# schedules

def get_lr_multiplier(step: int, num_iterations: int, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.2,
                      final_lr_frac: float = 0.0) -> float:
    """LR multiplier at `step` (0-based) of `num_iterations`: linear warmup from 1/warmup to 1 over
    the first round(warmup_ratio * num_iterations) steps, then 1, then a linear warmdown over
    the last round(warmdown_ratio * num_iterations) steps reaching `final_lr_frac` at step num_iterations."""
    if num_iterations < 1:
        raise ValueError(f"num_iterations: expected >= 1, got {num_iterations}")
    if not (0.0 <= warmup_ratio <= 1.0 and 0.0 <= warmdown_ratio <= 1.0 and warmup_ratio + warmdown_ratio <= 1.0):
        raise ValueError(f"warmup_ratio, warmdown_ratio: expected values in [0, 1] with a sum <= 1, "
                         f"got {warmup_ratio} and {warmdown_ratio}")
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = max(0.0, (num_iterations - step) / warmdown)  # 1 -> 0 over the warmdown
    return progress + (1.0 - progress) * final_lr_frac


def get_muon_momentum(step: int, warmup_steps: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    """Muon momentum: linear from `start` to `end` over the first `warmup_steps` steps, then `end`."""
    frac = min(step / warmup_steps, 1.0)
    return (1.0 - frac) * start + frac * end


def apply_lr(optimizers: Iterable[torch.optim.Optimizer], multiplier: float) -> None:
    """Set every group's lr to its `initial_lr` times `multiplier`."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
