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
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opensora_core.models.mmdit import MMDIT_SIZES, build_mmdit, prepare_img_ids, prepare_txt_ids

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Dense 16-bit tensor-core peaks (TFLOP/s) for the MFU column.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "BENCHMARKS.md"
SECTION = "## Training step"
COLUMNS = [
    "date", "device", "size", "params", "plugin", "dtype", "batch", "img tokens", "txt tokens",
    "ckpt blocks", "compile", "GFLOP/step", "step ms", "img tokens/s", "tokens/s", "TFLOP/s", "MFU", "peak GiB",
]  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="tiny", choices=sorted(MMDIT_SIZES), help="named MMDiT size")
    p.add_argument("--img-tokens", type=int, default=256, help="image tokens per sample")
    p.add_argument("--txt-tokens", type=int, default=32, help="text tokens per sample")
    p.add_argument("--batch", type=int, default=2, help="samples per device")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before counting and timing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--plugin", default="none", choices=["none", "ddp", "zero2"])
    p.add_argument(
        "--checkpoint-blocks", type=int, default=0, help="activation-checkpoint the first N blocks"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile every block")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (0 = known GPUs only)")
    p.add_argument("--write", action="store_true", help=f"append the result to {DEFAULT_OUTPUT.name}")
    p.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help="markdown file that --write appends to"
    )
    args = p.parse_args(argv)
    if args.plugin == "zero2" and not args.device.startswith("cuda"):
        p.error("--plugin zero2 needs CUDA (ColossalAI's LowLevelZeroPlugin); use none or ddp on CPU")
    if args.plugin == "zero2" and args.dtype == "fp32":
        p.error("--plugin zero2 trains in bf16 or fp16 over fp32 master weights: pass --dtype bf16")
    return args


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------
def maybe_init_distributed(device: torch.device) -> None:
    """Join torchrun's process group, or start a single-process one when run directly."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        )
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def token_grid(n: int) -> tuple[int, int, int]:
    """A (t, h, w) grid of n tokens, as square per frame as n allows (positions only shape rope)."""
    for t in (16, 9, 8, 4, 2, 1):
        side = math.isqrt(n // t)
        if t * side * side == n:
            return t, side, side
    h = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return 1, h, n // h


def build_inputs(model_config, args: argparse.Namespace, device: torch.device) -> tuple[dict, torch.Tensor]:
    """Random inputs of the requested shapes and a random regression target."""
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


def build_training(args: argparse.Namespace, device: torch.device):
    """Model, optimizer and a backward function, boosted by ColossalAI unless the plugin is ``none``."""
    dtype = DTYPES[args.dtype]
    model = build_mmdit(args.size, device=device, checkpoint_blocks=args.checkpoint_blocks)
    if args.plugin != "zero2":  # zero2 keeps fp32 master weights and casts its working copy itself
        model = model.to(dtype=dtype)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=fused)
    if args.plugin == "none":
        return model, model, optimizer, lambda loss: loss.backward()

    from colossalai.booster import Booster
    from colossalai.booster.plugin import LowLevelZeroPlugin, TorchDDPPlugin

    maybe_init_distributed(device)
    if args.plugin == "ddp":
        plugin = TorchDDPPlugin()
    else:
        plugin = LowLevelZeroPlugin(stage=2, precision=args.dtype, max_norm=0.0)
    booster = Booster(plugin=plugin)
    boosted, optimizer, *_ = booster.boost(model, optimizer)
    return boosted, model, optimizer, lambda loss: booster.backward(loss, optimizer)


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


def measure(args: argparse.Namespace) -> dict[str, str]:
    """Build, warm up, count FLOPs over one step, time ``--steps`` steps; one result row."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, plain_model, optimizer, backward = build_training(args, device)
    inputs, target = build_inputs(plain_model.config, args, device)

    def step() -> None:
        loss = F.mse_loss(model(**inputs).float(), target)
        backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # 1. FLOPs of one step, eager (a compiled graph hides its ops from the counter)
    for _ in range(1 if args.compile else args.warmup):
        step()
    flops = count_flops(step)
    if args.compile:
        for block in (*plain_model.double_blocks, *plain_model.single_blocks):
            block.compile()
        for _ in range(args.warmup):
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

    world = _world_size()
    peak = args.peak_tflops or _known_peak(device, args.dtype)
    tflops = flops / seconds / 1e12
    params = sum(p.numel() for p in plain_model.parameters())
    return {
        "date": dt.date.today().isoformat(),
        "device": _device_name(device) + (f" x{world}" if world > 1 else ""),
        "size": args.size,
        "params": f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M",
        "plugin": args.plugin,
        "dtype": args.dtype,
        "batch": str(args.batch),
        "img tokens": str(args.img_tokens),
        "txt tokens": str(args.txt_tokens),
        "ckpt blocks": str(args.checkpoint_blocks),
        "compile": "yes" if args.compile else "no",
        "GFLOP/step": f"{flops / 1e9:,.1f}",
        "step ms": f"{seconds * 1e3:.1f}",
        "img tokens/s": f"{world * args.batch * args.img_tokens / seconds:,.0f}",
        "tokens/s": f"{world * args.batch * (args.img_tokens + args.txt_tokens) / seconds:,.0f}",
        "TFLOP/s": f"{tflops:.3g}",
        "MFU": f"{100 * tflops / peak:.0f}%" if peak else "-",
        "peak GiB": f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}"
        if device.type == "cuda"
        else "-",
    }


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def _known_peak(device: torch.device, dtype: str) -> float:
    if device.type != "cuda" or dtype == "fp32":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), 0.0)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
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
    row = measure(args)
    if int(os.environ.get("RANK", 0)) == 0:
        print(markdown_header())
        print(markdown_row(row))
        if args.write:
            append_result(args.output, row)
            print(f"appended to {args.output}")
    if args.plugin != "none":
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
