"""CUDA's autocast policy, checked on the CPU: no large tensor of a training step goes through an op
that CUDA autocast runs in fp32 while CPU autocast does not.

The memory planner is validated on CPU. An out-of-place op that has an AutocastCUDA kernel (it is
on CUDA's fp32 list) and no AutocastCPU kernel returns bf16 here and fp32 on a GPU: a tensor the
plan never counted (`F.relu(h).square()` dispatching to pow made the MoleGrad MLP's (N, 4d)
activation fp32 on CUDA). The dispatcher's tables say which ops those are, so the CPU can find them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from nanochat.gpt import GPT, GPTConfig
from nanochat.model_flags import MEMORY_SETTINGS, MemoryFlags
from tests.helpers import TINY_GPT_CONFIG


# CUDA autocast's "promote to the widest input" ops (torch.amp's op reference): their output dtype
# is plain type promotion, the same as without autocast, so they differ from CPU in nothing.
CUDA_PROMOTE_OPS = {"aten::addcdiv", "aten::addcmul", "aten::atan2", "aten::bilinear", "aten::cross", "aten::dot",
                    "aten::grid_sampler", "aten::index_put", "aten::scatter_add", "aten::tensordot"}


def cuda_only_fp32(op) -> bool:
    """Whether CUDA autocast runs this op overload in fp32 and CPU autocast leaves it alone."""
    name = op.name()
    return (op._schema.name not in CUDA_PROMOTE_OPS
            and torch._C._dispatch_has_kernel_for_dispatch_key(name, "AutocastCUDA")
            and not torch._C._dispatch_has_kernel_for_dispatch_key(name, "AutocastCPU"))


class CudaOnlyUpcasts(TorchDispatchMode):
    """Records (op name, output shape) of out-of-place ops whose output has at least `min_numel`
    elements and which CUDA autocast would run in fp32 while CPU autocast does not (reductions,
    whose fp32 output is small, are not recorded)."""

    def __init__(self, min_numel: int) -> None:
        super().__init__()
        self.min_numel = min_numel
        self.found: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel() >= self.min_numel \
                and not func._schema.name.endswith("_") and cuda_only_fp32(func):
            self.found.append((func.name(), tuple(out.shape)))
        return out


def test_the_dispatcher_tables_know_pow():
    # the fact the check rests on, in this torch: out-of-place pow is CUDA-autocast fp32 only
    assert cuda_only_fp32(torch.ops.aten.pow.Tensor_Scalar)
    assert not cuda_only_fp32(torch.ops.aten.mm.default)  # bf16 on both
    assert not cuda_only_fp32(torch.ops.aten.addcmul.default)  # promotes, on both


def test_the_check_finds_an_out_of_place_square():
    h = torch.randn(64, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16), CudaOnlyUpcasts(min_numel=1024) as mode:
        F.relu(h).square()
    assert mode.found == [("aten::pow.Tensor_Scalar", (64, 128))]
    with torch.autocast("cpu", dtype=torch.bfloat16), CudaOnlyUpcasts(min_numel=1024) as mode:
        F.relu(h).square_()
    assert mode.found == []


@pytest.mark.parametrize("setting", sorted(MEMORY_SETTINGS))
def test_no_training_tensor_upcasts_on_cuda_only(setting):
    torch.manual_seed(0)
    options = MemoryFlags(molegrad_rank_k=4, **MEMORY_SETTINGS[setting]).memory_options()
    model = GPT(GPTConfig(**{**TINY_GPT_CONFIG, "n_embd": 64, "n_head": 2, "n_kv_head": 2}, **options))
    model.init_weights()
    idx = torch.randint(0, 97, (2, 16))
    # The forward only: CUDA runs backward on a thread without autocast, and a recompute reruns this
    # same forward code. The loss's logits are fp32 on both devices by design (chunked_softcap_cross_entropy).
    with torch.autocast("cpu", dtype=torch.bfloat16), CudaOnlyUpcasts(min_numel=idx.numel() * 64) as mode:
        loss = model(idx, targets=idx)
    loss.backward()
    assert [(name, shape) for name, shape in mode.found if shape[-1] != 97] == []
