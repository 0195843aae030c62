"""GPU training throughput of jobs/resnet/train.py's ResNet-18 on CIFAR-shaped data (for an H100/H200).

    python -m bench.bench_resnet_gpu                  # ~2-4 min on an H100; needs CUDA
    OUT=/some/dir python -m bench.bench_resnet_gpu    # also writes $OUT/gpu_bench.md

Measures, in one process on one GPU, samples/s of train.py's own `Trainer.train_step` (what users run) for
  1. fp32 eager, NCHW (PyTorch defaults)                                      -- the baseline
  2. bf16 autocast + channels_last (what train.py does on CUDA)
  3. bf16 autocast + channels_last + torch.compile (train.py --compile)
each selected by train.py's own flags (--precision, --memory-format, --compile), with the same model (width
64 = standard ResNet-18), batch, optimizer, schedule and on-GPU batched data, then a short end-to-end `train.py --data synthetic` run (50k CIFAR-shaped 32x32 images, 1 epoch) as a
subprocess, which includes evaluation, checkpointing and the outputs. Prints a markdown table with the device,
date, figures and the speed-up over fp32 (target: >= 2.5x).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.bench_resnet_cpu import TRAIN_PY, load_train_module

TARGET = 2.5


MODE_ARGS = {  # train.py flags per mode: the job's own Trainer builds model, optimizer and step from them
    "fp32": ["--precision", "fp32", "--memory-format", "contiguous"],
    "bf16+cl": ["--precision", "bf16", "--memory-format", "channels_last"],
    "bf16+cl+compile": ["--precision", "bf16", "--memory-format", "channels_last", "--compile"],
}


def measure(train, mode: str, opts: argparse.Namespace, data) -> float:
    """Samples/s of train.py's own `Trainer.train_step` (augmentation, normalisation, forward, backward, SGD,
    schedule) on batches gathered from the data set held on the GPU, as train.py feeds them there."""
    dev = torch.device("cuda", 0)
    argv = ["--data", "synthetic", "--batch-size", str(opts.batch_size), "--width", str(opts.width)]
    args = train.build_parser().parse_args([*argv, *MODE_ARGS[mode]])
    dctx = train.DistContext()
    train.configure_backends(args, dev, dctx)
    trainer = train.Trainer(args, data, dev, dctx, steps_per_epoch=len(data.x_train) // opts.batch_size)
    x_u8, y = data.x_train.to(dev), data.y_train.to(dev)
    g = torch.Generator(device=dev).manual_seed(0)

    def step(i: int) -> None:
        idx = torch.randint(0, len(x_u8), (opts.batch_size,), device=dev, generator=g)
        trainer.train_step(x_u8[idx], y[idx], i)

    for i in range(opts.warmup):  # includes compilation and cudnn autotuning
        step(i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(opts.steps):
        step(opts.warmup + i)
    torch.cuda.synchronize()
    return opts.steps * opts.batch_size / (time.perf_counter() - t0)


def end_to_end(extra: list[str], opts: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            str(TRAIN_PY),
            "--data",
            "synthetic",
            "--epochs",
            "1",
            "--batch-size",
            str(opts.batch_size),
            "--width",
            str(opts.width),
            "--outputs",
            tmp,
            "--no-resume",
            *extra,
        ]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=TRAIN_PY.parent, capture_output=True, text=True, timeout=900)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
        summary = json.loads((Path(tmp) / "summary.json").read_text())
    return {
        "samples_per_s": summary["samples_per_s"],
        "train_seconds": summary["train_seconds"],
        "process_seconds": wall,
        "device": summary["device"],
    }


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--batch-size", type=int, default=512)
    cli.add_argument("--width", type=int, default=64, help="64 = standard ResNet-18")
    cli.add_argument("--steps", type=int, default=60, help="timed steps per mode")
    cli.add_argument("--warmup", type=int, default=15, help="untimed steps per mode (compile, autotune)")
    cli.add_argument("--skip-compile", action="store_true")
    cli.add_argument("--skip-end-to-end", action="store_true")
    cli.add_argument(
        "--write-docs", action="store_true", help="also write the resnet-gpu section of docs/benchmarks.md"
    )
    opts = cli.parse_args()
    if not torch.cuda.is_available():
        print("bench_resnet_gpu: error: CUDA is not available; run this on a GPU machine", file=sys.stderr)
        return 2

    train = load_train_module()
    dev = torch.device("cuda", 0)
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(dev)
    data = train.load_synthetic_data(32, 50_000)  # what `train.py --data synthetic` trains on

    modes = ["fp32", "bf16+cl"] + ([] if opts.skip_compile else ["bf16+cl+compile"])
    results: dict[str, float] = {}
    for mode in modes:
        results[mode] = measure(train, mode, opts, data)
        print(f"{mode}: {results[mode]:.0f} samples/s", flush=True)
        torch.cuda.empty_cache()

    runs = {}
    if not opts.skip_end_to_end:
        runs["train.py"] = end_to_end([], opts)
        if not opts.skip_compile:
            runs["train.py --compile"] = end_to_end(["--compile"], opts)
        for k, v in runs.items():
            print(f"{k}: {v}", flush=True)

    base = results["fp32"]
    best = max(results.values())
    labels = {
        "fp32": "fp32 eager, NCHW (PyTorch defaults)",
        "bf16+cl": "bf16 autocast + channels_last",
        "bf16+cl+compile": "bf16 autocast + channels_last + torch.compile",
    }
    md = [
        "## ResNet-18 training throughput on GPU (`bench/bench_resnet_gpu.py`)",
        "",
        f"Device: **{name}**, torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}.",
        f"CIFAR-shaped synthetic data (3x32x32, on the GPU), ResNet-18 width {opts.width}, batch "
        f"{opts.batch_size}, {opts.steps} timed steps after {opts.warmup} warm-up steps of train.py's own",
        "`Trainer.train_step` (crop+flip, normalise, forward, backward, SGD, schedule) on batches gathered on the GPU.",
        "",
        "| mode | samples/s | vs fp32 |",
        "|---|---:|---:|",
    ]
    md += [f"| {labels[m]} | {v:.0f} | {v / base:.2f}x |" for m, v in results.items()]
    verdict = "met" if best / base >= TARGET else "NOT met"
    md += ["", f"Best speed-up over fp32: **{best / base:.2f}x** (target >= {TARGET}x: {verdict})."]
    if runs:
        md += [
            "",
            "End to end, `train.py --data synthetic --epochs 1` (50k images; includes evaluation of "
            "10k, checkpoint and outputs):",
            "",
            "| command | train samples/s | train s | process s |",
            "|---|---:|---:|---:|",
        ]
        for k, v in runs.items():
            if "error" in v:
                md.append(f"| `{k}` | failed: {v['error']} | | |")
            else:
                md.append(
                    f"| `{k}` | {v['samples_per_s']:.0f} | {v['train_seconds']:.1f} | {v['process_seconds']:.1f} |"
                )
    text = "\n".join(md) + "\n"
    print(text)
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "gpu_bench.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    if opts.write_docs:
        from bench._report import write_section

        write_section("resnet-gpu", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
