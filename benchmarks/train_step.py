"""Throughput of one MMDiT training step: forward + backward + AdamW, plain torch or ColossalAI.

Reports image tokens/s, all tokens/s and the achieved TFLOP/s per device, with FLOPs counted by
``torch.utils.flop_counter.FlopCounterMode`` over one whole step (CPU SDPA kernels are counted
with torch's own attention formulas, which it registers for the GPU kernels only). With
``--compile`` the FLOPs are counted on the eager model (the same math).

Plugins: ``none`` (plain torch; parameters in ``--dtype``, fused AdamW on CUDA), ``ddp``
(ColossalAI Booster + TorchDDPPlugin, parameters in ``--dtype``; on CPU a single-process gloo group
is started when not launched by torchrun), ``zero2`` (Booster + LowLevelZeroPlugin stage 2,
``--dtype`` working copy over fp32 master weights; CUDA only).

CPU, the tiny size (what this machine can run):

    .venv/bin/python benchmarks/train_step.py --size tiny --img-tokens 256 --txt-tokens 32 \\
        --batch 2 --dtype fp32 --steps 3 --device cpu --plugin none
    .venv/bin/python benchmarks/train_step.py --size tiny --img-tokens 256 --txt-tokens 32 \\
        --batch 2 --dtype fp32 --steps 3 --device cpu --plugin ddp

GPU, the 1B size at the shapes Open-Sora 2.0's own MMDiT was measured at (shared/gpu/README.md:
hidden 1536, 12 heads, 8 double + 16 single blocks, 2304 image + 512 text tokens, batch 4, bf16):

    torchrun --standalone --nproc_per_node 1 benchmarks/train_step.py --size 1B \\
        --img-tokens 2304 --txt-tokens 512 --batch 4 --dtype bf16 --steps 20 --warmup 3 \\
        --device cuda --plugin zero2 --write

and the same with ``--plugin none`` for the plain-torch row (the peer: 266 TFLOP/s plain,
178 TFLOP/s ZeRO-2, on one H200). On the lent GPU machine colossalai and its companions come as
carried wheels, installed first as shared/gpu/README.md shows.

Optimisations, each switchable for on/off rows (``benchmarks/gpu_suite.py`` runs them):
``--no-fused-qkv`` (one matmul per projection), ``--sdpa`` (SDPA backend), ``--compile`` (of every
block), ``--adamw`` (fused / foreach / loop), ``--checkpoint-blocks`` (activation checkpointing
policy), ``--bucket-mb`` and ``--no-overlap`` (ZeRO-2 reduce buckets and communication overlap).
``--json PATH`` writes the raw figures and settings of the run.

``--lora`` (``--lora-rank``, ``--lora-alpha``) trains LoRA adapters on the default targets with the
base frozen (``opensora_core.models.lora.apply_lora``), for the full-vs-LoRA memory and throughput
rows; the JSON names the trainable parameter count.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opensora_core.models.mmdit import MMDIT_SIZES, MMDiTConfig, build_mmdit, prepare_img_ids, prepare_txt_ids

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Dense 16-bit tensor-core peaks (TFLOP/s) for the MFU column, matched in this order against the
# card's name (an H100 PCIe is slower than the SXM part that "H100" alone stands for).
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
ADAMW_MODES = ("auto", "fused", "foreach", "loop")
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "BENCHMARKS.md"
SECTION = "## Training step"
COLUMNS = [
    "date", "device", "size", "params", "plugin", "dtype", "batch", "img tokens", "txt tokens",
    "ckpt blocks", "compile", "GFLOP/step", "step ms", "img tokens/s", "tokens/s", "TFLOP/s", "MFU", "peak GiB",
]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Arguments: one group per concern
# --------------------------------------------------------------------------------------------
def add_shape_args(p: argparse.ArgumentParser) -> None:
    """Model size, token shapes, batch, dtype, device, plugin and step counts."""
    g = p.add_argument_group("what to run")
    g.add_argument("--size", default="tiny", choices=sorted(MMDIT_SIZES), help="named MMDiT size")
    g.add_argument("--img-tokens", type=int, default=256, help="image tokens per sample")
    g.add_argument("--txt-tokens", type=int, default=32, help="text tokens per sample")
    g.add_argument("--batch", type=int, default=2, help="samples per device")
    g.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    g.add_argument("--steps", type=int, default=5, help="timed steps")
    g.add_argument("--warmup", type=int, default=2, help="untimed steps before counting and timing")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--plugin", default="none", choices=["none", "ddp", "zero2"])
    g.add_argument("--lora", action="store_true", help="train LoRA adapters only (the base frozen)")
    g.add_argument("--lora-rank", type=int, default=4, help="LoRA rank with --lora")
    g.add_argument("--lora-alpha", type=float, default=4.0, help="LoRA alpha with --lora")


def add_optimisation_args(p: argparse.ArgumentParser) -> None:
    """The switchable optimisations (each measured on and off by the GPU suite)."""
    g = p.add_argument_group("optimisations")
    g.add_argument(
        "--no-fused-qkv", dest="fused_qkv", action="store_false", help="one matmul per q/k/v projection"
    )
    g.add_argument("--sdpa", default="auto", choices=SDPA_BACKENDS, help="SDPA backend (auto = torch picks)")
    g.add_argument("--compile", action="store_true", help="torch.compile every block")
    g.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (eager for a dry run)"
    )
    g.add_argument("--adamw", default="auto", choices=ADAMW_MODES, help="AdamW kernel (auto: fused on CUDA)")
    g.add_argument(
        "--checkpoint-blocks", type=int, default=0, help="activation-checkpoint the first N blocks (-1 = all)"
    )
    g.add_argument("--bucket-mb", type=int, default=12, help="zero2: reduce bucket size in M elements")
    g.add_argument(
        "--no-overlap", dest="overlap", action="store_false", help="zero2: no communication overlap"
    )


def add_output_args(p: argparse.ArgumentParser) -> None:
    """Where the figures go."""
    g = p.add_argument_group("output")
    g.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (0 = known GPUs only)")
    g.add_argument("--write", action="store_true", help=f"append the result to {DEFAULT_OUTPUT.name}")
    g.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help="markdown file that --write appends to"
    )
    g.add_argument("--json", type=Path, default=None, help="write the raw figures and settings here")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject combinations that cannot run, with the reason."""
    if args.plugin == "zero2" and not args.device.startswith("cuda"):
        p.error("--plugin zero2 needs CUDA (ColossalAI's LowLevelZeroPlugin); use none or ddp on CPU")
    if args.plugin == "zero2" and args.dtype == "fp32":
        p.error("--plugin zero2 trains in bf16 or fp16 over fp32 master weights: pass --dtype bf16")
    if args.lora and args.lora_rank < 1:
        p.error(f"--lora-rank must be >= 1, got {args.lora_rank}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(p)
    add_optimisation_args(p)
    add_output_args(p)
    args = p.parse_args(argv)
    check_args(p, args)
    return args


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------
def token_grid(n: int) -> tuple[int, int, int]:
    """A (t, h, w) grid of n tokens, as square per frame as n allows (positions only shape rope)."""
    for t in (17, 16, 9, 8, 4, 2, 1):
        side = math.isqrt(n // t)
        if t * side * side == n:
            return t, side, side
    h = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return 1, h, n // h


def build_inputs(
    model_config: MMDiTConfig, args: argparse.Namespace, device: torch.device
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random inputs of the requested shapes and a random target (B, img_tokens, out_channels)."""
    b, li, lt = args.batch, args.img_tokens, args.txt_tokens
    inputs = {
        "img": torch.randn(b, li, model_config.in_channels, device=device),
        "img_ids": prepare_img_ids(*token_grid(li), batch_size=b, device=device),
        "txt": torch.randn(b, lt, model_config.context_in_dim, device=device),
        "txt_ids": prepare_txt_ids(b, lt, device=device),
        "timesteps": torch.rand(b, device=device),
        "y_vec": torch.randn(b, model_config.vec_in_dim, device=device),
    }
    if model_config.cond_embed:
        cond_dim = model_config.in_channels + model_config.patch_size**2
        inputs["cond"] = torch.randn(b, li, cond_dim, device=device)
    return inputs, torch.randn(b, li, model_config.out_channels or model_config.in_channels, device=device)


def build_adamw(params: Iterator[torch.nn.Parameter], mode: str, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the requested kernel: ``fused`` (one kernel), ``foreach`` (batched), ``loop``."""
    if mode == "auto":
        mode = "fused" if device.type == "cuda" else "foreach"
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[mode]
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, **kernel)


def build_training(
    args: argparse.Namespace, device: torch.device
) -> tuple[torch.nn.Module, torch.nn.Module, Any, Callable[[torch.Tensor], None]]:
    """Model (boosted or plain), the plain MMDiT, the optimizer and a backward function.

    Boosting goes through the product's :func:`opensora_core.distributed.booster.build_booster`.
    """
    model = build_mmdit(
        args.size, device=device, checkpoint_blocks=args.checkpoint_blocks, fused_qkv=args.fused_qkv
    )
    if args.lora:  # adapters on the default targets; the base is frozen, so AdamW holds no state for it
        from opensora_core.config import LoraConfig
        from opensora_core.models.lora import apply_lora

        apply_lora(model, LoraConfig(enabled=True, rank=args.lora_rank, alpha=args.lora_alpha))
    if args.plugin != "zero2":  # zero2 keeps fp32 master weights and casts its working copy itself
        model = model.to(dtype=DTYPES[args.dtype])
    optimizer = build_adamw((p for p in model.parameters() if p.requires_grad), args.adamw, device)
    if args.plugin == "none":
        return model, model, optimizer, lambda loss: loss.backward()

    from opensora_core.distributed.booster import build_booster
    from opensora_core.distributed.dist import init_distributed

    init_distributed()
    if args.plugin == "ddp":  # parameters already in --dtype; no AMP on top
        booster = build_booster("ddp", "fp32")
    else:
        booster = build_booster(
            "zero2",
            args.dtype,
            reduce_bucket_size_in_m=args.bucket_mb,
            overlap_communication=args.overlap,
        )
    boosted, optimizer, *_ = booster.boost(model, optimizer)
    return boosted, model, optimizer, lambda loss: booster.backward(loss, optimizer)


@contextmanager
def sdpa_backend(name: str) -> Iterator[None]:
    """Restrict SDPA to one backend (``auto`` leaves torch's choice)."""
    if name == "auto":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]
    with sdpa_kernel(backend):
        yield


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------
def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def count_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call of ``step`` as FlopCounterMode counts them."""
    aten = torch.ops.aten
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
    }
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        step()
    return counter.get_total_flops()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Build, warm up, count FLOPs over one step, time ``--steps`` steps; the raw figures."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, plain_model, optimizer, backward = build_training(args, device)
    inputs, target = build_inputs(plain_model.config, args, device)

    def step() -> None:
        loss = F.mse_loss(model(**inputs).float(), target)
        backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with sdpa_backend(args.sdpa):
        # 1. FLOPs of one step, eager (a compiled graph hides its ops from the counter)
        for _ in range(1 if args.compile else args.warmup):
            step()
        flops = count_flops(step)
        if args.compile:
            for block in (*plain_model.double_blocks, *plain_model.single_blocks):
                block.compile(backend=args.compile_backend)
            for _ in range(max(1, args.warmup)):
                step()

        # 2. timed steps
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        _sync(device)
        seconds = (time.perf_counter() - start) / args.steps
    return summarize(args, device, plain_model, flops, seconds)


def summarize(
    args: argparse.Namespace, device: torch.device, model: torch.nn.Module, flops: int, seconds: float
) -> dict[str, Any]:
    """The raw figures and settings of one run (what ``--json`` writes)."""
    world = _world_size()
    peak = args.peak_tflops or _known_peak(device, args.dtype)
    tflops = flops / seconds / 1e12
    return {
        "date": dt.date.today().isoformat(),
        "device": _device_name(device),
        "world_size": world,
        "size": args.size,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "lora_rank": args.lora_rank if args.lora else 0,
        "plugin": args.plugin,
        "dtype": args.dtype,
        "batch": args.batch,
        "img_tokens": args.img_tokens,
        "txt_tokens": args.txt_tokens,
        "fused_qkv": args.fused_qkv,
        "sdpa": args.sdpa,
        "compile": args.compile_backend if args.compile else "",
        "adamw": args.adamw,
        "checkpoint_blocks": args.checkpoint_blocks,
        "bucket_mb": args.bucket_mb if args.plugin == "zero2" else None,
        "overlap": args.overlap if args.plugin == "zero2" else None,
        "flops_per_step": flops,
        "step_s": seconds,
        "img_tokens_per_s": world * args.batch * args.img_tokens / seconds,
        "tokens_per_s": world * args.batch * (args.img_tokens + args.txt_tokens) / seconds,
        "tflops": tflops,
        "peak_tflops": peak or None,
        "mfu": tflops / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def peak_for_card(name: str) -> float:
    """Dense bf16 peak TFLOP/s of a card by its name (0 when unknown)."""
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), 0.0)


def _known_peak(device: torch.device, dtype: str) -> float:
    if device.type != "cuda" or dtype == "fp32":
        return 0.0
    return peak_for_card(torch.cuda.get_device_name(device))


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
def format_row(result: dict[str, Any]) -> dict[str, str]:
    """The markdown columns of one result of :func:`measure`."""
    params, world = result["params"], result["world_size"]
    mem = result["peak_mem_gib"]
    return {
        "date": result["date"],
        "device": result["device"] + (f" x{world}" if world > 1 else ""),
        "size": result["size"],
        "params": f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M",
        "plugin": result["plugin"] + (f" +LoRA r{result['lora_rank']}" if result["lora_rank"] else ""),
        "dtype": result["dtype"],
        "batch": str(result["batch"]),
        "img tokens": str(result["img_tokens"]),
        "txt tokens": str(result["txt_tokens"]),
        "ckpt blocks": str(result["checkpoint_blocks"]),
        "compile": "yes" if result["compile"] else "no",
        "GFLOP/step": f"{result['flops_per_step'] / 1e9:,.1f}",
        "step ms": f"{result['step_s'] * 1e3:.1f}",
        "img tokens/s": f"{result['img_tokens_per_s']:,.0f}",
        "tokens/s": f"{result['tokens_per_s']:,.0f}",
        "TFLOP/s": f"{result['tflops']:.3g}",
        "MFU": f"{100 * result['mfu']:.0f}%" if result["mfu"] is not None else "-",
        "peak GiB": f"{mem:.1f}" if mem is not None else "-",
    }


def markdown_row(row: dict[str, str]) -> str:
    return "| " + " | ".join(row[c] for c in COLUMNS) + " |"


def markdown_header() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


def append_result(path: Path, row: dict[str, str]) -> None:
    """Add ``row`` at the end of the "Training step" table of ``path``, creating file or section."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.rstrip("\n").split("\n")
    if SECTION not in lines:
        intro = (
            "Measured by `benchmarks/train_step.py` (forward + backward + AdamW; FLOPs by FlopCounterMode)."
        )
        lines += ["", SECTION, "", intro, "", *markdown_header().split("\n")]
        end = len(lines)
    else:
        start = lines.index(SECTION)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        while end > start + 1 and not lines[end - 1].strip():
            end -= 1
    lines.insert(end, markdown_row(row))
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = measure(args)
    row = format_row(result)
    if int(os.environ.get("RANK", 0)) == 0:
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(markdown_header())
        print(markdown_row(row))
        if args.write:
            append_result(args.output, row)
            print(f"appended to {args.output}")
    if args.plugin != "none":
        from opensora_core.distributed.dist import destroy_distributed

        destroy_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
