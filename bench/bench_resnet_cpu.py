"""CPU training throughput: jobs/resnet/train.py's step path vs a naive PyTorch loop, same model and data.

    .venv/bin/python -m bench.bench_resnet_cpu            # ~1-2 min; writes the "resnet-cpu" section

The job path: the in-memory data set fed by index tensors (no per-sample Dataset), batched crop+flip as one
gather, channels_last, SGD nesterov + schedule, exactly `Trainer.train_step` from train.py.
The naive loop: the same ResNet-18 in fp32 NCHW, a per-sample `Dataset` (crop+flip per image) through a
default `DataLoader` (no workers), and the same loss, optimizer and schedule (train.py's own
`make_optimizer`/`make_scheduler`: SGD nesterov, no weight decay on BatchNorm/biases, one-cycle, stepped each
step). Both run in this process with the same thread count; the rounds alternate which loop goes first, so
neither always gets the warmer caches; the figure is the median round.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from bench._report import write_section

TRAIN_PY = Path(__file__).resolve().parent.parent / "jobs" / "resnet" / "train.py"


def load_train_module():
    spec = importlib.util.spec_from_file_location("resnet_train", TRAIN_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules["resnet_train"] = module
    spec.loader.exec_module(module)
    return module


class PerSampleDataset(Dataset):
    """What a first PyTorch script does: one image at a time, transformed in __getitem__."""

    def __init__(self, x_u8: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, pad: int):
        self.x, self.y, self.pad = x_u8, y, pad
        self.mean, self.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        img = self.x[i].float().div(255)
        img = (img - self.mean) / self.std
        h, w = img.shape[1:]
        img = F.pad(img, (self.pad,) * 4)
        top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
        img = img[:, top : top + h, left : left + w]
        if torch.rand(()) < 0.5:
            img = img.flip(2)
        return img, self.y[i]


def time_job(train, args, data, steps: int, warmup: int) -> float:
    dctx = train.DistContext()
    steps_per_epoch = len(data.x_train) // args.batch_size
    trainer = train.Trainer(args, data, torch.device("cpu"), dctx, steps_per_epoch)
    feeder = train.BatchFeeder(data.x_train, data.y_train, torch.device("cpu"), args.workers)
    step, t0, epoch = 0, 0.0, 0
    while True:
        order = train.epoch_order(len(data.x_train), args.seed, epoch)
        index = train.shard_batches(order, 0, 1, args.batch_size)
        for x, y in feeder.batches(index):
            if step == warmup:
                t0 = time.perf_counter()
            trainer.train_step(x, y, step)
            step += 1
            if step == warmup + steps:
                return steps * args.batch_size / (time.perf_counter() - t0)
        epoch += 1


def time_naive(train, args, data, steps: int, warmup: int) -> float:
    torch.manual_seed(args.seed)
    model = train.ResNet18(10, args.width)  # fp32, NCHW
    opt = train.make_optimizer(model, args)
    sched = train.make_scheduler(opt, args, args.epochs * (len(data.x_train) // args.batch_size))
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    mean, std = data.channel_stats()
    ds = PerSampleDataset(data.x_train, data.y_train, mean, std, max(1, args.image_size // 8))
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True)
    step, t0 = 0, 0.0
    while True:
        for x, y in loader:
            if step == warmup:
                t0 = time.perf_counter()
            loss = criterion(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step == warmup + steps:
                return steps * args.batch_size / (time.perf_counter() - t0)


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--rounds", type=int, default=5)
    cli.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    opts = cli.parse_args()
    train = load_train_module()
    configs = [  # (label, train.py arguments, timed steps per round)
        (
            "digits 16 px, width 16, batch 64",
            ["--data", "digits", "--image-size", "16", "--width", "16", "--batch-size", "64"],
            40,
        ),
        (
            "the demo args: digits 32 px (CIFAR-shaped), width 16, batch 64",
            ["--data", "digits", "--image-size", "32", "--width", "16", "--batch-size", "64"],
            20,
        ),
    ]
    rows = []
    for label, argv, steps in configs:
        args = train.build_parser().parse_args([*argv, "--workers", "0"])
        train.configure_backends(args, torch.device("cpu"), train.DistContext())
        data = train.load_digits_data(args.image_size)
        job, naive = [], []
        for r in range(opts.rounds):
            first, second = (time_naive, naive), (time_job, job)
            for fn, out in (first, second) if r % 2 == 0 else (second, first):
                out.append(fn(train, args, data, steps, warmup=3))
        j, n = statistics.median(job), statistics.median(naive)
        print(f"{label}: job {j:.0f} samples/s, naive {n:.0f} samples/s, x{j / n:.2f}", flush=True)
        rows.append((label, j, n))
    threads = torch.get_num_threads()
    md = [
        "## ResNet-18 training throughput on CPU (`bench/bench_resnet_cpu.py`)",
        "",
        "`jobs/resnet/train.py`'s training step (index-tensor batches from the in-memory data set, batched",
        "crop+flip, channels_last, fp32) vs a naive loop with the same model, loss, optimizer and schedule",
        "(train.py's `make_optimizer`/`make_scheduler`; fp32 NCHW, per-sample `Dataset` through a default",
        f"`DataLoader`, no workers). Same data, same batch size, {threads} torch threads, median of",
        f"{opts.rounds} rounds that alternate which loop runs first.",
        "",
        "| configuration | train.py (samples/s) | naive loop (samples/s) | speed-up |",
        "|---|---:|---:|---:|",
    ]
    md += [f"| {label} | {j:.0f} | {n:.0f} | {j / n:.2f}x |" for label, j, n in rows]
    md.append(f"\ntorch {torch.__version__}.")
    text = "\n".join(md)
    print(text)
    if not opts.no_write:
        write_section("resnet-cpu", text)


if __name__ == "__main__":
    main()
