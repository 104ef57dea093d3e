"""The CUDA-only branches of device setup, dtype, MFU and error handling, checked on the CPU by
patching torch.cuda's functions (issue 24): what a first GPU run meets before any kernel runs."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import nanochat.common as common
from nanochat.common import RunContext, device_summary, peak_flops, resolve_dtype, run_main
from nanochat.gpt import GPT, GPTConfig
from nanochat.trainer import Progress
from tests.helpers import TINY_BASE_TRAIN_ARGS


def cuda_context(dtype: torch.dtype = torch.bfloat16) -> RunContext:
    return RunContext(torch.device("cuda", 0), "cuda", dtype, False, 0, 0, 1)


def fake_gpu(monkeypatch, name: str = "NVIDIA GeForce RTX 5090", capability: tuple[int, int] = (12, 0),
             total_memory: int = 32 * 2**30) -> None:
    """torch.cuda as on a machine with one such GPU whose bf16 tensors can be created (emulated or not)."""
    props = SimpleNamespace(name=name, major=capability[0], minor=capability[1], total_memory=total_memory)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
    monkeypatch.setattr(torch.version, "hip", None)


# ---------------------------------------------------------------------------------------------
# A1: bf16 only where it is native

@pytest.mark.parametrize("capability,expected", [((7, 5), torch.float32), ((7, 0), torch.float32),
                                                 ((8, 0), torch.bfloat16), ((8, 6), torch.bfloat16),
                                                 ((9, 0), torch.bfloat16), ((12, 0), torch.bfloat16)])
def test_auto_dtype_on_cuda_is_bf16_only_where_native(monkeypatch, capability, expected):
    fake_gpu(monkeypatch, capability=capability)
    assert torch.cuda.is_bf16_supported()  # torch's default counts emulated bf16: T4/V100/RTX 20xx say yes
    assert resolve_dtype("cuda", "auto") == expected
    assert resolve_dtype("cuda", "bfloat16") == torch.bfloat16  # an explicit choice is kept


# ---------------------------------------------------------------------------------------------
# A2: what computes is said in one line; no silent CPU fallback; expandable segments

def test_device_summary_names_the_gpu_its_capability_and_versions(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0), 80 * 2**30)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    line = device_summary(cuda_context())
    assert "\n" not in line
    for part in ("cuda:0", "NVIDIA H100 80GB HBM3", "compute capability 9.0", "80.0 GiB", "CUDA 12.8",
                 f"torch {torch.__version__}", "compute bfloat16"):
        assert part in line, (part, line)


def test_device_summary_on_cpu_names_the_cpu_and_threads():
    line = device_summary(RunContext(torch.device("cpu"), "cpu", torch.float32, False, 0, 0, 1))
    assert "\n" not in line
    assert line.startswith("device: cpu ") and common.cpu_model_name() in line
    assert f"{torch.get_num_threads()} threads" in line and f"torch {torch.__version__}" in line


def test_a_cpu_fallback_beside_an_nvidia_driver_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    assert common.autodetect_device_type("") == "cpu"
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "NVIDIA driver is installed" in out[0] and "--device=cuda" in out[0], out
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert common.autodetect_device_type("") == "cpu" and capsys.readouterr().out == ""


@pytest.mark.parametrize("preset", [None, "expandable_segments:False"])
def test_cuda_runs_get_expandable_segments_before_cuda_initialises(monkeypatch, preset):
    fake_gpu(monkeypatch)
    if preset is None:
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    else:
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", preset)
    seen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: seen.append(common.os.environ.get("PYTORCH_CUDA_ALLOC_CONF")))
    monkeypatch.setattr(common, "seed_everything", lambda seed: None)  # would queue CUDA seeding calls
    monkeypatch.setattr(torch.backends.cuda, "matmul", SimpleNamespace(allow_tf32=False))  # process-wide switches
    monkeypatch.setattr(torch.backends, "cudnn", SimpleNamespace(allow_tf32=False))
    ctx = common.compute_init(device="cuda", threads=1)
    assert ctx.device == torch.device("cuda", 0) and ctx.dtype == torch.bfloat16
    assert seen == [preset or "expandable_segments:True"]  # set when CUDA initialises, a user's value kept


# ---------------------------------------------------------------------------------------------
# A8: expected failures are one line

def one_error_line(capsys, body) -> str:
    with pytest.raises(SystemExit) as e:
        run_main(body, None)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cuda_out_of_memory_is_one_line_with_what_to_do(capsys):
    def body(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                     "79.19 GiB of which 1.06 GiB is free.\nOf the allocated memory ...")

    line = one_error_line(capsys, body)
    assert "out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)" in line, line
    for advice in ("python -m nanochat.memory", "--device_batch_size", "--memory_mode"):
        assert advice in line


def test_cpu_out_of_memory_is_one_line(capsys):
    line = one_error_line(capsys, lambda cfg: torch.empty(2**45))  # 128 TiB: the allocator refuses at once
    assert "out of memory (DefaultCPUAllocator: can't allocate memory" in line and "--device_batch_size" in line, line


def test_a_process_group_failure_is_one_line(capsys):
    def body(cfg):
        raise torch.distributed.DistNetworkError("The client socket has timed out after 300000ms while trying to "
                                                 "connect to (10.0.0.1, 29500).\nException raised from ...")

    line = one_error_line(capsys, body)
    assert "the process group failed (DistNetworkError: The client socket has timed out" in line, line
    assert "--master_addr" in line


def test_an_unexpected_error_keeps_its_traceback():
    def body(cfg):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_main(body, None)


# ---------------------------------------------------------------------------------------------
# B3: MFU denominators by exact device name, causal attention FLOPs

DATASHEET_TFLOPS = {  # dense bf16, no sparsity (GeForce: FP32 accumulate)
    "NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 PCIe": 756.5, "NVIDIA H100 NVL": 835, "NVIDIA H200": 989.4,
    "NVIDIA B200": 2250, "NVIDIA A100-SXM4-80GB": 312, "NVIDIA A100-SXM4-40GB": 312, "NVIDIA A100-PCIE-40GB": 312,
    "NVIDIA A100 80GB PCIe": 312, "NVIDIA L4": 121, "NVIDIA L40": 181, "NVIDIA L40S": 362,
    "NVIDIA GeForce RTX 3090": 71, "NVIDIA GeForce RTX 4090": 165.2, "NVIDIA GeForce RTX 5090": 209.5,
}
MEASURED = 12.5e12  # what the patched matmul "measures"


@pytest.fixture
def measured_matmul(monkeypatch):
    monkeypatch.setattr(common, "_measured_peaks", {})
    calls = []
    monkeypatch.setattr(common, "matmul_flops", lambda device, dtype, size=1024, **kw: calls.append((device, dtype)) or MEASURED)
    return calls


@pytest.mark.parametrize("name", sorted(DATASHEET_TFLOPS))
def test_mfu_denominator_is_the_datasheet_peak_of_that_exact_gpu(monkeypatch, measured_matmul, name):
    fake_gpu(monkeypatch, name)
    assert peak_flops(cuda_context()) == pytest.approx(DATASHEET_TFLOPS[name] * 1e12)
    assert measured_matmul == []


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 4090 Laptop GPU", "NVIDIA GeForce RTX 5090 Laptop GPU",
                                  "NVIDIA H100 80GB HBM3e", "NVIDIA L40-12Q", "Tesla T4", "NVIDIA RTX A6000"])
def test_any_other_gpu_gets_a_measured_peak_said_in_one_line(monkeypatch, capsys, measured_matmul, name):
    fake_gpu(monkeypatch, name)
    assert peak_flops(cuda_context()) == MEASURED and peak_flops(cuda_context()) == MEASURED  # measured once
    assert len(measured_matmul) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "MFU: relative to a 4096x4096 bfloat16 matmul measured now" in out[0] and name in out[0], out


def test_a_float32_run_on_a_listed_gpu_is_not_held_to_its_bf16_peak(monkeypatch, measured_matmul):
    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3")
    assert peak_flops(cuda_context(torch.float32)) == MEASURED
    assert measured_matmul == [(torch.device("cuda", 0), torch.float32)]


def test_estimate_flops_counts_causal_attention():
    """Against a hand count: 6 FLOPs per weight of every Linear (forward 2, backward 4), and QKᵀ and
    AV (2 FLOPs per multiply-add each, forward + backward = 3x forward) only where the causal mask
    keeps a score: query t sees keys 0..t."""
    config = GPTConfig(sequence_len=7, vocab_size=11, n_layer=3, n_head=4, n_kv_head=2, n_embd=16)
    model = GPT(config)
    linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    kept_scores = int(torch.ones(config.sequence_len, config.sequence_len).tril().sum())
    attention_forward = config.n_layer * config.n_head * kept_scores * config.head_dim * (2 + 2)  # QKᵀ and AV
    per_token = 6 * linears + 3 * attention_forward / config.sequence_len
    assert model.estimate_flops() == pytest.approx(per_token, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# no MFU above 100%

def test_progress_raises_its_peak_instead_of_reporting_more_than_100_percent(capsys):
    progress = Progress(total_steps=10, tokens_per_step=1000, flops_per_token=1e6, peak_flops=1e9)
    assert progress.mfu(500) == pytest.approx(50.0)
    assert progress.mfu(2000) == pytest.approx(100.0)  # 2e9 FLOP/s against a 1e9 peak
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "MFU: the model ran at 0.002 TFLOP/s, above the 0.001 TFLOP/s peak" in out[0], out
    assert progress.mfu(1000) == pytest.approx(50.0)  # now relative to the best rate seen
    assert progress.mfu(8000) == pytest.approx(100.0)
    assert capsys.readouterr().out == ""  # said once


def test_base_train_prints_no_mfu_above_100_percent_when_the_startup_peak_was_low(base_dir, monkeypatch, capsys):
    """The startup matmul measured at a busy moment (here: patched to 1 kFLOP/s): every step's MFU
    still reads at most 100%, and the raise is said once."""
    from scripts import base_train

    monkeypatch.setattr(common, "_measured_peaks", {})
    monkeypatch.setattr(common, "matmul_flops", lambda *args, **kwargs: 1e3)
    base_train.main(TINY_BASE_TRAIN_ARGS + ["--num_iterations=3", "--eval_every=-1", "--model_tag=mfu"])
    out = capsys.readouterr().out
    mfus = [float(m) for m in re.findall(r"MFU ([0-9.]+)%", out)]
    assert len(mfus) == 3 and all(0 < m <= 100.0 for m in mfus), mfus
    assert out.count("above the") == 1
    assert out.splitlines()[0].startswith("device: cpu ")  # the device line comes first


def test_train_throughput_prints_a_finite_mfu_of_at_most_100_percent(monkeypatch, capsys):
    from bench import train_throughput

    monkeypatch.setattr(train_throughput, "set_cpu_threads", lambda threads: common.set_cpu_threads(1))
    monkeypatch.setattr(train_throughput, "matmul_flops", lambda *args, **kwargs: 1e3)  # a busy moment
    results = train_throughput.main(["--depth=1", "--max_seq_len=16", "--device_batch_size=2", "--total_batch_size=32",
                                     "--vocab_size=64", "--steps=1", "--warmup=0", "--arms=bf16_1thread"])
    assert len(results) == 1 and 0 < results[0]["mfu"] <= 1.0
    assert "raised to the best arm's rate" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# B2: check_memory_fits keeps a reserve

@pytest.mark.parametrize("total,reserve_gib", [(24 * 2**30, 2.0), (80 * 2**30, 4.0), (192 * 2**30, 9.6)])
def test_memory_reserve_is_the_larger_of_2_gib_and_5_percent(monkeypatch, total, reserve_gib):
    from scripts.base_train import device_reserve

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (total // 2, total))
    assert device_reserve(torch.device("cuda", 0)) == pytest.approx(reserve_gib * 2**30, rel=1e-9)


def test_check_memory_fits_keeps_the_reserve_free_on_a_gpu(monkeypatch):
    from nanochat.config import ConfigError
    from nanochat.gpt import config_from_depth
    from nanochat.memory import plan_memory
    from scripts import base_train

    config = config_from_depth(2, 512, 64)
    peak = plan_memory(config, 2, "bfloat16", 1, "cuda").peak
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 80 * 2**30))
    reserve = 4 * 2**30  # 5% of 80 GiB
    monkeypatch.setattr(base_train, "available_memory", lambda device: peak + reserve)
    base_train.check_memory_fits(config, 2, 1, cuda_context())
    monkeypatch.setattr(base_train, "available_memory", lambda device: peak + reserve - 1)
    with pytest.raises(ConfigError, match=r"of which 4.0 GiB stay in reserve \(max\(2 GiB, 5% of the total\)"):
        base_train.check_memory_fits(config, 2, 1, cuda_context())
    cpu = RunContext(torch.device("cpu"), "cpu", torch.bfloat16, False, 0, 0, 1)
    assert base_train.device_reserve(cpu.device) == 0  # MemAvailable already leaves the system its share
    base_train.check_memory_fits(config, 2, 1, cpu)


# ---------------------------------------------------------------------------------------------
# A2: --device=cuda without a usable GPU says why; the device check run10.sh prints first

@pytest.mark.parametrize("cuda,visible,expected", [
    (None, None, "CPU-only build"),
    ("13.0", "", "CUDA_VISIBLE_DEVICES='' hides every GPU"),
    ("13.0", None, "driver too old for CUDA 13.0"),
])
def test_device_cuda_without_a_gpu_says_why(monkeypatch, cuda, visible, expected):
    from nanochat.config import ConfigError, RuntimeFlags

    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with pytest.raises(ConfigError, match=re.escape(expected)) as error:
        RuntimeFlags(device="cuda").validate()
    assert str(error.value).startswith("--device=cuda: ") and "\n" not in str(error.value)


def test_the_device_check_names_the_device_and_the_attention_kernel(capsys):
    from nanochat.common import compute_init
    from scripts.device_check import DeviceCheckFlags, describe_device

    cfg = DeviceCheckFlags(device="cpu", threads=1, head_dim=64, n_head=2, seq_len=256)
    assert describe_device(cfg, compute_init(cfg)) == "FLASH_ATTENTION"  # the CPU's flash kernel
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("device: cpu ") and out[1] == "training attention: FLASH_ATTENTION for 2 heads x 64 x 256 tokens"


def test_training_attention_on_an_old_gpu_fails_in_one_line_with_the_right_advice(monkeypatch):
    """bf16 on capability 7.5: neither allowed kernel runs; the line says to train in fp32 (not bf16)."""
    from nanochat import gpt

    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))

    def no_kernel(*args, **kwargs):
        raise RuntimeError("No available kernel. Aborting execution.")

    monkeypatch.setattr(gpt.F, "scaled_dot_product_attention", no_kernel)
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"capability 7\.5 GPU.*bf16 needs capability 8\.0\+ \(else --dtype=float32\)"):
        gpt.causal_attention(q, q, q, gqa=False)


@pytest.mark.parametrize("capability,arch_list,runs", [
    ((12, 0), ["sm_80", "sm_90", "sm_100", "sm_120"], True),     # RTX 5090 on a CUDA 12.8+ build
    ((12, 0), ["sm_75", "sm_80", "sm_86", "sm_90"], False),      # ... on an older build: no kernel image
    ((8, 9), ["sm_80", "sm_86", "sm_90"], True),                 # RTX 4090 runs the sm_86 cubins
    ((7, 0), ["sm_75", "sm_80", "sm_90", "sm_120"], False),      # V100 on a build without Volta
    ((12, 0), ["sm_80", "sm_90", "compute_90"], True),           # PTX compiled on load
])
def test_setup_checks_that_the_build_has_kernels_for_the_gpu(capability, arch_list, runs):
    assert common.cuda_build_runs_on(arch_list, capability) is runs


def test_setup_stops_in_one_line_when_the_build_has_no_kernels_for_the_gpu(monkeypatch):
    fake_gpu(monkeypatch, capability=(12, 0))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_90"])
    with pytest.raises(SystemExit, match=r"no kernels for NVIDIA GeForce RTX 5090 \(sm_120\): set TORCH_INDEX_URL"):
        common.check_cuda_build("575.51")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # the suite hides GPUs (conftest)
    with pytest.raises(SystemExit, match=r"driver too old for CUDA 13\.0.*\(driver 575\.51\)"):
        common.check_cuda_build("575.51")


def test_check_memory_fits_plans_the_precision_options(monkeypatch):
    """A model that fits with bf16 weights and int8 states (--memory_mode=standard's precision) but
    not in fp32 passes the check only when the options are passed."""
    from nanochat.config import ConfigError
    from nanochat.gpt import config_from_depth
    from nanochat.memory import plan_memory
    from scripts import base_train

    config = config_from_depth(2, 512, 64)
    precision = dict(param_dtype="bfloat16", grad_dtype="auto", optim_state="int8")
    low = plan_memory(config, 2, "bfloat16", 1, "cuda", **precision).peak
    assert low < plan_memory(config, 2, "bfloat16", 1, "cuda").peak
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 80 * 2**30))
    monkeypatch.setattr(base_train, "available_memory", lambda device: low + 4 * 2**30)
    base_train.check_memory_fits(config, 2, 1, cuda_context(), precision)
    with pytest.raises(ConfigError, match="the memory plan of a training step needs"):
        base_train.check_memory_fits(config, 2, 1, cuda_context())
