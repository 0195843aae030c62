#!/usr/bin/env python3
"""Train a CIFAR-style ResNet-18 in plain PyTorch: on a laptop CPU, one GPU, or many under torchrun.

    python train.py --data digits --epochs 3 --width 16 --image-size 16       # offline, ~1 min on 2 cores
    python train.py                                                           # CIFAR-10, downloaded once
    python -m torch.distributed.run --nproc_per_node 2 train.py --data digits # 2 processes, gloo/nccl

Outputs (in --outputs, default $REMOTEFIT_OUTPUTS or ./outputs): metrics.jsonl, summary.json, curves.png and
checkpoint.pt. A checkpoint in the outputs folder is resumed automatically; SIGTERM (a spot interruption)
saves one at the next step boundary and exits 143. See README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import io
import json
import math
import os
import pickle
import queue
import random
import signal
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

PROG = "train.py"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FILE = "cifar-10-python.tar.gz"
CHECKPOINT = "checkpoint.pt"
CKPT_FORMAT = "remotefit-resnet/1"
EXIT_USAGE = 2
EXIT_SIGNAL = {signal.SIGTERM: 143, signal.SIGINT: 130}
# Arguments that must match between a checkpoint and the run resuming it.
RESUME_KEYS = (
    "data",
    "epochs",
    "batch_size",
    "lr",
    "width",
    "image_size",
    "seed",
    "schedule",
    "weight_decay",
    "label_smoothing",
    "synthetic_samples",
    "world_size",
)


class UsageError(Exception):
    """A bad input or environment: reported as one `train.py: error: ...` line, exit 2, no traceback."""


# --------------------------------------------------------------------------------------------- arguments
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line. Long but flat: one add_argument per option, in the order --help lists them."""
    p = _Parser(
        prog=PROG,
        description="Train a CIFAR-style ResNet-18 (CPU, GPU, or torchrun).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--data",
        choices=("cifar10", "digits", "synthetic"),
        default=None,
        help="cifar10 (the default): from job.toml [data], else downloaded once into $REMOTEFIT_CACHE (default "
        "~/.cache/remotefit/data), else — when --data was not given — the bundled digits, said loudly; "
        "digits: scikit-learn's offline 8x8 digits, upscaled; synthetic: random, for speed",
    )
    p.add_argument("--epochs", type=_positive_int, default=10)
    p.add_argument("--batch-size", type=_positive_int, default=256, help="per process")
    p.add_argument("--lr", type=_positive_float, default=0.2, help="peak learning rate (SGD, nesterov)")
    p.add_argument("--schedule", choices=("onecycle", "cosine"), default="onecycle")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument(
        "--width",
        type=_positive_int,
        default=64,
        help="base channels (64 = standard ResNet-18; 8-16 trains fast on a CPU)",
    )
    p.add_argument("--image-size", type=_positive_int, default=32, help="images are resized once to this")
    p.add_argument(
        "--synthetic-samples",
        type=_positive_int,
        default=50_000,
        help="training-set size for --data synthetic (test set: a fifth of it)",
    )
    p.add_argument(
        "--workers",
        type=_non_negative_int,
        default=2,
        help="batches prefetched by a background thread when the data set stays in host memory "
        "(0: none); in-memory data sets on the GPU need none",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="auto and bf16: bf16 autocast on CUDA (the CPU always computes in fp32); fp32: fp32 everywhere, "
        "no TF32 either",
    )
    p.add_argument(
        "--memory-format",
        choices=("channels_last", "contiguous"),
        default="channels_last",
        help="channels_last is faster for convolutions on GPUs and on CPUs (oneDNN)",
    )
    p.add_argument(
        "--deterministic", action="store_true", help="deterministic kernels: a resumed run matches an uninterrupted one"
    )
    p.add_argument(
        "--outputs",
        type=Path,
        default=Path(os.environ.get("REMOTEFIT_OUTPUTS") or "outputs"),
        help="folder for metrics, summary, curves and checkpoint (default $REMOTEFIT_OUTPUTS)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=_non_negative_int,
        default=500,
        help="also checkpoint every N steps (0: only at epoch ends)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="resume from PATH (default <outputs>/checkpoint.pt, which is also resumed automatically when it exists)",
    )
    p.add_argument("--no-resume", action="store_true", help="ignore (and overwrite) an existing checkpoint")
    p.add_argument(
        "--max-steps",
        type=_positive_int,
        default=None,
        help="stop after this many steps in total (the schedule still spans --epochs)",
    )
    return p


# ------------------------------------------------------------------------------------------------ model
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class ResNet18(nn.Module):
    """ResNet-18 for small images: 3x3 stem without max-pool, stages of width w, 2w, 4w, 8w."""

    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        layers, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # zero-init the last BN of each block: each block starts as identity
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def weights_sha256(model: nn.Module) -> str:
    """A hash of every parameter and buffer: equal hashes mean bit-identical weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------- data
@dataclass
class Data:
    """A data set held in memory as uint8 NCHW images and int64 labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int = 10

    def channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x_train.float().div_(255)
        return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-3)


def _resize_u8(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x.contiguous()
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, len(x), 4096):  # in chunks: bounded memory for 50k images
        chunk = F.interpolate(
            x[i : i + 4096].float(),
            size=(size, size),
            mode="bilinear",
            align_corners=False,
            antialias=size < x.shape[-1],
        )
        out[i : i + 4096] = chunk.round_().clamp_(0, 255).to(torch.uint8)
    return out


def load_digits_data(image_size: int) -> Data:
    """scikit-learn's bundled 8x8 digits (1797 images, offline), upscaled, 3 channels, fixed 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images).float().mul_(255 / 16).round_().to(torch.uint8)[:, None]
    x = _resize_u8(x, image_size).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(d.target).long()
    train, test = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=d.target)
    train, test = torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(test))
    return Data("digits", x[train], y[train], x[test], y[test])


def load_synthetic_data(image_size: int, samples: int) -> Data:
    """Random images and labels (nothing to learn): for throughput only."""
    g = torch.Generator().manual_seed(1234)
    n_test = max(1, samples // 5)
    x = torch.randint(0, 256, (samples + n_test, 3, image_size, image_size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (samples + n_test,), generator=g)
    return Data("synthetic", x[:samples], y[:samples], x[samples:], y[samples:])


def cache_dir() -> Path:
    return Path(os.environ.get("REMOTEFIT_CACHE") or Path.home() / ".cache" / "remotefit" / "data")


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ensure_cifar10(cache: Path) -> Path:
    """Download the CIFAR-10 python tarball once (md5 verified); return its path."""
    path = cache / CIFAR10_FILE
    if path.exists():
        return path
    url = os.environ.get("REMOTEFIT_CIFAR10_URL") or CIFAR10_URL
    hint = "for an offline run use --data digits"
    tmp = None
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{CIFAR10_FILE}.", suffix=".part")
        h = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as resp:  # noqa: S310
            for block in iter(lambda: resp.read(1 << 20), b""):
                out.write(block)
                h.update(block)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != CIFAR10_MD5:
            raise UsageError(
                f"CIFAR-10 download from {url} is corrupt (md5 {h.hexdigest()}, "
                f"expected {CIFAR10_MD5}); try again, or {hint}"
            )
        os.replace(tmp, path)
        tmp = None
    except UsageError:
        raise
    except (OSError, ValueError, urllib.error.URLError) as e:
        reason = getattr(e, "reason", None) or e
        raise UsageError(f"could not download CIFAR-10 from {url} ({reason}); {hint}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return path


def load_cifar10_data(path: Path, image_size: int) -> Data:
    if _md5(path) != CIFAR10_MD5:
        raise UsageError(
            f"{path} fails its md5 check; delete it to download again, or for an offline run use --data digits"
        )
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar.getmembers():
            name = os.path.basename(member.name)
            if name.startswith("data_batch_") or name == "test_batch":
                f = tar.extractfile(member)
                assert f is not None
                batch = pickle.load(f, encoding="bytes")  # noqa: S301 (md5-verified file)
                parts[name] = (batch[b"data"], np.asarray(batch[b"labels"]))
    train = [parts[f"data_batch_{i}"] for i in range(1, 6)]
    x_train = torch.from_numpy(np.concatenate([x for x, _ in train])).view(-1, 3, 32, 32)
    y_train = torch.from_numpy(np.concatenate([y for _, y in train])).long()
    x_test = torch.from_numpy(parts["test_batch"][0]).view(-1, 3, 32, 32)
    y_test = torch.from_numpy(parts["test_batch"][1]).long()
    return Data("cifar10", _resize_u8(x_train, image_size), y_train, _resize_u8(x_test, image_size), y_test)


def cifar10_from_job_data() -> Path | None:
    """CIFAR-10 that remotefit's job.toml [data] put in the job folder: a prefix linked at data/cifar10/
    or the one file at data/cifar-10-python.tar.gz (see job.toml). None when neither is there."""
    here = Path(__file__).parent
    for path in (here / "data" / "cifar10" / CIFAR10_FILE, here / "data" / CIFAR10_FILE):
        if path.is_file():
            return path
    return None


def load_data(args: argparse.Namespace, dctx: DistContext) -> Data:
    if args.data == "digits":
        return load_digits_data(args.image_size)
    if args.data == "synthetic":
        return load_synthetic_data(args.image_size, args.synthetic_samples)
    # cifar10: from job.toml [data] when it is configured (fetched by remotefit before the run, on every
    # node), else downloaded into the cache; a failed download names the bundled, offline --data digits.
    local = cifar10_from_job_data()
    if local is not None:
        if dctx.is_main:
            print(f"data: CIFAR-10 from job.toml [data]: {local}", flush=True)
        return load_cifar10_data(local, args.image_size)
    # cifar10: one process per node downloads, the others wait; everyone learns if it failed.
    error, path = None, cache_dir() / CIFAR10_FILE
    if dctx.local_rank == 0:
        try:
            path = ensure_cifar10(cache_dir())
        except UsageError as e:
            error = str(e)
    errors = dctx.all_gather_object(error)
    if any(errors):
        first = next(e for e in errors if e)
        if getattr(args, "data_explicit", True):
            raise UsageError(first)
        # The default data set cannot be had (offline node, no [data]): the bundled one, said loudly and
        # recorded (summary.json's "data", the checkpoint's arguments), never silently.
        if dctx.is_main:
            print(f"data: WARNING: {first.split(';')[0]}; falling back to the bundled digits data", flush=True)
        args.data = "digits"
        return load_digits_data(args.image_size)
    return load_cifar10_data(path, args.image_size)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch: a pure function of (seed, epoch), so a resumed run sees the same."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def shard_batches(order: torch.Tensor, rank: int, world: int, batch: int) -> torch.Tensor:
    """This rank's batches as a (steps, batch) index matrix; like DistributedSampler with drop_last."""
    steps = len(order) // (batch * world)
    return order[rank::world][: steps * batch].view(steps, batch)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The augmentation randomness of one step, derived from (seed, step, rank): resumable, no state."""
    s = np.random.SeedSequence([seed & 0xFFFFFFFF, step, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(s[0]) << 32 | int(s[1]))


def augment(x: torch.Tensor, g: torch.Generator, pad: int) -> torch.Tensor:
    """Random crop (zero padding `pad`) + horizontal flip of a uint8 batch, as one gather on its device."""
    b, c, h, w = x.shape
    dev = x.device
    top = torch.randint(0, 2 * pad + 1, (b, 1), generator=g)
    left = torch.randint(0, 2 * pad + 1, (b, 1), generator=g)
    flip = torch.rand((b, 1), generator=g) < 0.5
    rows = top + torch.arange(h)
    cols = left + torch.arange(w)
    cols = torch.where(flip, cols.flip(1), cols)  # a flipped crop is the crop read right to left
    rows, cols = rows.to(dev, non_blocking=True), cols.to(dev, non_blocking=True)
    xp = F.pad(x, (pad, pad, pad, pad))
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return xp[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


class BatchFeeder:
    """Index-tensor batches from an in-memory data set: no per-sample Dataset, no collate.

    The data set lives on the training device when it fits (GPU: a gather per batch, no copies);
    otherwise in host memory, gathered into pinned buffers by a prefetch thread and copied non_blocking.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, device: torch.device, workers: int) -> None:
        self.device, self.workers = device, workers
        on_device = device.type == "cpu"
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            on_device = x.numel() < free // 4
        self.x = x.to(device) if on_device else x
        self.y = y.to(device) if on_device else y
        self.on_device = on_device
        self.pin = device.type == "cuda" and not on_device

    def _host_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xb = torch.empty((len(idx), *self.x.shape[1:]), dtype=self.x.dtype, pin_memory=self.pin)
        yb = torch.empty((len(idx),), dtype=self.y.dtype, pin_memory=self.pin)
        torch.index_select(self.x, 0, idx, out=xb)
        torch.index_select(self.y, 0, idx, out=yb)
        return xb, yb

    def batches(self, index: torch.Tensor, start: int = 0):
        """Yield (x_uint8, y) on the device for rows start.. of the (steps, batch) index matrix."""
        if self.on_device:
            index = index.to(self.device)
            for b in range(start, len(index)):
                yield self.x[index[b]], self.y[index[b]]
            return
        if self.workers == 0:
            for b in range(start, len(index)):
                xb, yb = self._host_batch(index[b])
                yield xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
            return
        q: queue.Queue = queue.Queue(maxsize=self.workers)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                with contextlib.suppress(queue.Full):
                    q.put(item, timeout=0.1)
                    return True
            return False

        def produce() -> None:
            for b in range(start, len(index)):
                if not put(self._host_batch(index[b])):
                    return
            put(None)

        t = threading.Thread(target=produce, daemon=True, name="prefetch")
        t.start()
        try:
            while (item := q.get()) is not None:
                yield item[0].to(self.device, non_blocking=True), item[1].to(self.device, non_blocking=True)
        finally:
            stop.set()
            t.join()


# ------------------------------------------------------------------------------------------ distributed
class DistContext:
    """Rank/world bookkeeping; a no-op when not launched by torchrun."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        self.initialized = False
        self.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        self.device = device
        if self.world > 1:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.initialized = True

    def all_gather_object(self, obj):
        if not self.initialized:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        if not self.initialized:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if self.initialized:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.initialized:
            dist.barrier()

    def close(self) -> None:
        if self.initialized:
            with contextlib.suppress(Exception):
                dist.barrier()
            dist.destroy_process_group()
            self.initialized = False


# --------------------------------------------------------------------------------------------- training
def make_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """SGD with nesterov momentum; weight decay on weights, none on BatchNorm parameters and biases."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        momentum=0.9,
        nesterov=True,
    )


def make_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace, total: int):  # noqa: ANN201
    """One-cycle (default) or warm-up + cosine over `total` steps, stepped once per training step."""
    if args.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=args.lr,
            total_steps=total,
            pct_start=0.25,
            div_factor=20,
            final_div_factor=200,
            cycle_momentum=False,
        )
    warmup = max(1, total // 20)

    def cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)


class Trainer:
    """The model, optimizer, schedule and the one training step everything else drives."""

    def __init__(
        self, args: argparse.Namespace, data: Data, device: torch.device, dctx: DistContext, steps_per_epoch: int
    ) -> None:
        self.args, self.device, self.dctx = args, device, dctx
        self.cuda = device.type == "cuda"
        torch.manual_seed(args.seed)
        model = ResNet18(data.num_classes, args.width).to(device)
        self.memory_format = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
        self.bf16 = self.cuda and args.precision in ("auto", "bf16")
        self.model = model.to(memory_format=self.memory_format)
        self.optimizer = make_optimizer(model, args)
        self.scheduler = make_scheduler(self.optimizer, args, args.epochs * steps_per_epoch)
        net: nn.Module = model
        if dctx.initialized:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if self.cuda else None, gradient_as_bucket_view=True
            )
        self.net = torch.compile(net) if args.compile else net
        self.criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        mean, std = data.channel_stats()
        # x_norm = (x_u8 / 255 - mean) / std = x_u8 * scale - shift
        self.scale = (1 / (255 * std)).view(1, -1, 1, 1).to(device)
        self.shift = (mean / std).view(1, -1, 1, 1).to(device)
        self.pad = max(1, args.image_size // 8)

    def autocast(self):
        if self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def normalize(self, x_u8: torch.Tensor) -> torch.Tensor:
        x = x_u8.float().mul_(self.scale).sub_(self.shift)
        return x.contiguous(memory_format=self.memory_format)

    def train_step(self, x_u8: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        x = self.normalize(augment(x_u8, step_generator(self.args.seed, step, self.dctx.rank), self.pad))
        with self.autocast():
            loss = self.criterion(self.net(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    def sync_buffers(self) -> None:
        """Average BatchNorm running statistics over ranks, so every rank holds identical weights."""
        if not self.dctx.initialized:
            return
        for name, buf in self.model.named_buffers():
            if buf.is_floating_point():
                self.dctx.all_reduce(buf)
                buf.div_(self.dctx.world)
            elif name.endswith("num_batches_tracked"):
                dist.broadcast(buf, 0)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) on the whole test set, split over ranks."""
        self.model.eval()
        idx = torch.arange(self.dctx.rank, len(x), self.dctx.world)
        bs = max(512, self.args.batch_size)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for i in range(0, len(idx), bs):
            j = idx[i : i + bs]
            if x.device != torch.device("cpu") or self.device.type == "cpu":
                xb, yb = x[j.to(x.device)], y[j.to(y.device)]
            else:
                xb, yb = x[j].pin_memory(), y[j].pin_memory()
            xb, yb = xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
            with self.autocast():
                logits = self.model(self.normalize(xb)).float()
            sums[0] += F.cross_entropy(logits, yb, reduction="sum").double()
            sums[1] += (logits.argmax(1) == yb).sum()
            sums[2] += len(yb)
        self.dctx.all_reduce(sums)
        self.model.train()
        return float(sums[0] / sums[2]), float(sums[1] / sums[2])


# ------------------------------------------------------------------------------------- files and state
def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Write via `write(file)` to a temp file beside `path`, fsync, then os.replace: never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; these are outputs to share
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint; any problem becomes one UsageError line naming the file (left untouched)."""
    advice = "it was left untouched; move it away, or pass --no-resume to start over (which overwrites it)"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"--resume: no checkpoint at {path}") from None
    except Exception as e:  # torch raises many kinds for a torn or foreign file
        detail = " ".join(str(e).split())
        if isinstance(e, pickle.UnpicklingError | EOFError) or "weights only load failed" in detail.lower():
            what = "corrupt, truncated, or not a torch checkpoint"
        else:
            what = f"{type(e).__name__}: {detail[:120]}"
        raise UsageError(f"checkpoint {path} is unreadable ({what}); {advice}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise UsageError(f"checkpoint {path} is not a {CKPT_FORMAT} checkpoint; {advice}")
    return ckpt


@dataclass
class Progress:
    """Where training stands; everything a checkpoint needs besides model/optimizer/scheduler."""

    epoch: int = 0  # the epoch in progress (== epochs when done)
    batch: int = 0  # batches of that epoch already trained
    step: int = 0  # global optimizer steps
    loss_sum: float = 0.0  # this epoch's summed train loss (over all ranks) ...
    loss_count: int = 0  # ... and number of losses in it
    epoch_samples: int = 0
    epoch_seconds: float = 0.0
    samples_total: int = 0
    train_seconds_total: float = 0.0
    history: list | None = None


def resume_args(args: argparse.Namespace, world: int) -> dict:
    values = vars(args) | {"world_size": world}
    return {k: values[k] for k in RESUME_KEYS}


# ------------------------------------------------------------------------------------------ the outputs
def plot_curves(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    epochs = [m["epoch"] for m in history]
    marker = "o" if len(history) < 30 else None
    ax_loss.plot(epochs, [m["train_loss"] for m in history], marker=marker, label="train (label-smoothed)")
    ax_loss.plot(epochs, [m["test_loss"] for m in history], marker=marker, label="test")
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.plot(epochs, [m["test_acc"] for m in history], marker=marker, color="tab:green", label="test")
    ax_acc.set(title="Test accuracy", xlabel="epoch", ylabel="accuracy", ylim=(0, 1))
    if history:
        best = max(history, key=lambda m: m["test_acc"])
        ax_acc.annotate(
            f"best {best['test_acc']:.3f}",
            (best["epoch"], best["test_acc"]),
            textcoords="offset points",
            xytext=(0, -16),
            ha="center",
        )
    else:
        for ax in (ax_loss, ax_acc):
            ax.text(0.5, 0.5, "no epoch completed yet", transform=ax.transAxes, ha="center")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if history:
            ax.legend()
            ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


class Scalars:
    """TensorBoard scalars in outputs/tb, beside metrics.jsonl, when tensorboard is importable (add it to
    requirements.txt and `inv fit --tensorboard` serves them); otherwise nothing, metrics.jsonl has it all."""

    KEYS = ("train_loss", "test_loss", "test_acc", "lr", "samples_per_s")

    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch without the tensorboard package
            self.writer = None
            return
        self.writer = SummaryWriter(str(folder))

    def add(self, row: dict) -> None:
        if self.writer is None:
            return
        for key in self.KEYS:
            self.writer.add_scalar(key, row[key], row["epoch"])
        self.writer.flush()


def write_outputs(outputs: Path, prog: Progress, summary: dict, title: str, curves: bool) -> None:
    history = prog.history or []
    atomic_write_text(outputs / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history))
    atomic_write_text(outputs / "summary.json", json.dumps(summary, indent=2) + "\n")
    if curves:
        plot_curves(history, outputs / "curves.png", title)


# ------------------------------------------------------------------------------------ signals and device
class StopFlag:
    """Remembers SIGTERM/SIGINT; the loop acts on it at the next step boundary. A second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum


def pick_device(choice: str, dctx: DistContext) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
        raise UsageError(
            f"--device cuda requested but CUDA is not available ({build}); use --device cpu or --device auto"
        )
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", dctx.local_rank % torch.cuda.device_count())


def configure_backends(args: argparse.Namespace, device: torch.device, dctx: DistContext) -> str:
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not args.deterministic
        tf32 = args.precision != "fp32"  # fp32 means full fp32 math: PyTorch's own defaults for matmuls
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    elif "OMP_NUM_THREADS" not in os.environ:  # share the cores between the processes of this node
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // max(1, dctx.local_world)))
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    layout = args.memory_format
    if device.type == "cuda":
        math_mode = "fp32" if args.precision == "fp32" else "bf16 autocast"
        return f"{torch.cuda.get_device_name(device)} {math_mode}, {layout}"
    threads = torch.get_num_threads()
    return f"cpu fp32 {layout}, {threads} thread{'s' if threads > 1 else ''}"


# ---------------------------------------------------------------------------------------------- the run
# run() is the whole job, top to bottom: setup (device, data, model), resume (checkpoint), the epochs
# (train_epoch, end_epoch), the report (finish). The steps follow it in that order. Steps marked collective
# are called by every rank at the same step under torchrun (they all-reduce or gather): none may be skipped
# on one rank alone, or the others wait forever.
@dataclass
class Setup:
    """What every step reads and none changes: the arguments, this process's place, the data and the model."""

    args: argparse.Namespace
    stop: StopFlag
    dctx: DistContext
    log: Callable[..., None]  # print on rank 0, silent on the others
    started: float  # perf_counter() when the run began: summary.json's wall_seconds
    device: torch.device
    describe: str  # device, math and memory layout, for the log and summary.json
    outputs: Path
    ckpt_path: Path
    data: Data
    steps_per_epoch: int
    trainer: Trainer  # model, optimizer, schedule, the training step
    feeder: BatchFeeder
    x_test: torch.Tensor  # on the device when the training set is
    y_test: torch.Tensor
    title: str  # curves.png's
    signal_every: int  # steps between two looks at the stop flag (see setup)


@dataclass
class TrainState:
    """What the steps change: the progress record (checkpointed) and the steps not yet booked into it."""

    prog: Progress
    resume_from: Path | None = None  # the checkpoint this run resumed from, if any
    scalars: Scalars | None = None  # rank 0's TensorBoard writer, made at the first epoch's end
    loss_acc: torch.Tensor | None = None  # the epoch's loss sum, kept on the device: no host sync per step
    t0: float = 0.0  # when the steps not yet booked began
    steps: int = 0  # how many steps are not yet booked


def run(args: argparse.Namespace, stop: StopFlag, dctx: DistContext) -> int:
    """Train: data and model, then resume from a checkpoint if there is one, then the epochs, then the report.
    Returns the exit code: 0, or 143/130 after SIGTERM/SIGINT (with a checkpoint saved)."""
    job = setup(args, stop, dctx)  # device, data, model, optimizer
    state = resume(job)  # from the checkpoint, when there is one
    prog = state.prog
    if prog.epoch >= args.epochs:  # a finished job run again: report, do not train again
        job.log(
            f"training already finished (checkpoint {state.resume_from} is at epoch {prog.epoch}/{args.epochs}); "
            "use --no-resume or another --outputs to train again",
            flush=True,
        )
        return finish(job, state, "completed", 0)
    reason = stop_reason(job, state, force=True)  # a signal while loading, or resumed at --max-steps
    if reason:
        if prog.step > 0:
            save_checkpoint(job, state)
        return exit_for(job, state, reason)
    state.loss_acc = torch.zeros((), dtype=torch.float64, device=job.device)
    while prog.epoch < args.epochs:
        reason = train_epoch(job, state)
        if reason and prog.batch < job.steps_per_epoch:  # stopped mid-epoch; train_epoch saved a checkpoint
            return exit_for(job, state, reason)
        end_epoch(job, state)  # evaluate, metrics, checkpoint, running outputs
        reason = reason or stop_reason(job, state, force=True)
        if reason and prog.epoch < args.epochs:
            return exit_for(job, state, reason)
    code = finish(job, state, "completed", 0)
    best = max(m["test_acc"] for m in prog.history)
    job.log(
        f"done: test_acc {prog.history[-1]['test_acc']:.4f} (best {best:.4f}), {prog.step} steps, "
        f"{time.perf_counter() - job.started:.1f} s; outputs in {job.outputs}/",
        flush=True,
    )
    return code


# ---- step 1: device, data, model
def _quiet(*_args, **_kwargs) -> None:
    """The log of ranks other than 0: under torchrun only rank 0 speaks."""


def steps_per_epoch_for(args: argparse.Namespace, data: Data, dctx: DistContext) -> int:
    """Full batches per epoch on each rank (a last partial batch is dropped); a UsageError when there are none."""
    if len(data.x_train) < args.batch_size * dctx.world:
        procs = f" x {dctx.world} processes" if dctx.world > 1 else ""
        raise UsageError(
            f"--batch-size {args.batch_size}{procs} is larger than the "
            f"{len(data.x_train)}-sample training set of --data {data.name}; "
            "use a smaller --batch-size"
        )
    return len(data.x_train) // (args.batch_size * dctx.world)


def setup(args: argparse.Namespace, stop: StopFlag, dctx: DistContext) -> Setup:
    """Collective. Device, data, then the model (Trainer seeds it): all the loop needs. Ends with the one-line
    header, the sign that training starts now."""
    started = time.perf_counter()
    log = print if dctx.is_main else _quiet
    device = pick_device(args.device, dctx)
    dctx.init(device)  # the process group, before load_data's first collective
    describe = configure_backends(args, device, dctx)
    data = load_data(args, dctx)
    steps_per_epoch = steps_per_epoch_for(args, data, dctx)
    trainer = Trainer(args, data, device, dctx, steps_per_epoch)  # model, optimizer, schedule, DDP
    feeder = BatchFeeder(data.x_train, data.y_train, device, args.workers)
    x_test, y_test = data.x_test, data.y_test
    if feeder.on_device:  # evaluate where the training set lives
        x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    procs = f" x {dctx.world} processes" if dctx.world > 1 else ""
    job = Setup(
        args=args,
        stop=stop,
        dctx=dctx,
        log=log,
        started=started,
        device=device,
        describe=describe,
        outputs=args.outputs,
        ckpt_path=args.outputs / CHECKPOINT,
        data=data,
        steps_per_epoch=steps_per_epoch,
        trainer=trainer,
        feeder=feeder,
        x_test=x_test,
        y_test=y_test,
        title=f"ResNet-18 (width {args.width}) on {data.name}, {args.image_size}px, batch {args.batch_size}{procs}",
        # Under torchrun every rank must stop at the same step, so the stop flag is all-reduced: on CPU at
        # every step (cheap), with NCCL every 10th step (each check syncs the GPU with the host).
        signal_every=10 if dctx.initialized and device.type == "cuda" else 1,
    )
    log(
        f"resnet18 width {args.width} | {data.name}: {len(data.x_train)} train / {len(data.x_test)} test, "
        f"{args.image_size}px | {describe} | {dctx.world} process{'es' if dctx.world > 1 else ''} | "
        f"{steps_per_epoch} steps/epoch x {args.epochs} epochs, batch {args.batch_size}",
        flush=True,
    )
    return job


# ---- step 2: the checkpoint. Rank 0 reads and writes it; the others get it by broadcast (nodes need not
# share a disk).
def resume_path(args: argparse.Namespace, ckpt_path: Path) -> Path | None:
    """--resume PATH (bare --resume: <outputs>/checkpoint.pt), else <outputs>/checkpoint.pt when it exists;
    None with --no-resume."""
    if args.no_resume:
        return None
    if args.resume is not None:
        return Path(args.resume) if args.resume else ckpt_path
    return ckpt_path if ckpt_path.exists() else None


def read_resume_payload(args: argparse.Namespace, world: int, path: Path) -> dict | str:
    """Rank 0: the checkpoint at `path`, or the one error line to fail with (unreadable, or written by a run
    with other arguments, which would not continue the same training)."""
    try:
        payload = load_checkpoint(path)
    except UsageError as e:
        return str(e)
    want, have = resume_args(args, world), payload.get("args", {})
    diff = [k for k in RESUME_KEYS if have.get(k) != want[k]]
    if not diff:
        return payload
    k = diff[0]
    flag = "--" + k.replace("_", "-") if k != "world_size" else "the number of processes"
    return (
        f"checkpoint {path} was written with {flag} {have.get(k)}, this run "
        f"has {want[k]}; use the same arguments, another --outputs, or --no-resume"
    )


def resume(job: Setup) -> TrainState:
    """Collective. A fresh TrainState, or one resumed from the checkpoint: model, optimizer, schedule, RNG and
    progress all restored."""
    state = TrainState(prog=Progress(history=[]), resume_from=resume_path(job.args, job.ckpt_path))
    if state.resume_from is None:
        return state
    payload = read_resume_payload(job.args, job.dctx.world, state.resume_from) if job.dctx.is_main else None
    payload = job.dctx.broadcast_object(payload)
    if isinstance(payload, str):  # every rank fails with rank 0's message
        raise UsageError(payload)
    job.trainer.model.load_state_dict(payload["model"])
    job.trainer.optimizer.load_state_dict(payload["optimizer"])
    job.trainer.scheduler.load_state_dict(payload["scheduler"])
    set_rng_state(payload["rng"])
    state.prog = prog = Progress(**payload["progress"])
    if not job.dctx.is_main:  # rank 0 carries the epoch's loss sum so far; see save_checkpoint()
        prog.loss_sum, prog.loss_count = 0.0, 0
    job.log(f"resuming from {state.resume_from}: epoch {prog.epoch + 1}, step {prog.step}", flush=True)
    return state


def reduced_loss(job: Setup, state: TrainState) -> torch.Tensor:
    """Collective: BN buffers synced, then [loss sum, loss count] summed over ranks."""
    job.trainer.sync_buffers()
    on_gpu = job.dctx.initialized and job.device.type == "cuda"
    return job.dctx.all_reduce(
        torch.tensor(
            [state.prog.loss_sum, state.prog.loss_count],
            dtype=torch.float64,
            device=job.device if on_gpu else "cpu",
        )
    )


def save_checkpoint(job: Setup, state: TrainState) -> None:
    """Collective (all ranks call it at the same step); rank 0 writes, atomically: a kill mid-write leaves the
    previous checkpoint. The epoch's loss sum moves to rank 0, so the file holds all of it."""
    args, prog, dctx, trainer = job.args, state.prog, job.dctx, job.trainer
    sums = reduced_loss(job, state)
    if not dctx.is_main:
        prog.loss_sum, prog.loss_count = 0.0, 0
        return
    prog.loss_sum, prog.loss_count = float(sums[0]), int(sums[1])
    ckpt = {
        "format": CKPT_FORMAT,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "progress": vars(prog).copy(),
        "args": resume_args(args, dctx.world),
        "rng": rng_state(),
        "data_order": {
            "seed": args.seed,
            "epoch": prog.epoch,
            "batch": prog.batch,
            "world_size": dctx.world,
            "batch_size": args.batch_size,
            "scheme": "randperm(seed*1000003+epoch)[rank::world]; augmentation from (seed, step, rank)",
        },
    }
    atomic_write(job.ckpt_path, lambda f: torch.save(ckpt, f))


# ---- step 3: the loop
def stop_reason(job: Setup, state: TrainState, force: bool = False) -> str | None:
    """Collective when distributed: every rank calls it at the same steps and gets the same answer."""
    dctx, prog = job.dctx, state.prog
    if dctx.initialized and (force or prog.step % job.signal_every == 0):
        flag = torch.tensor([0 if job.stop.signum is None else 1], device=job.device)
        dctx.all_reduce(flag, op=dist.ReduceOp.MAX)
        stopping = bool(flag.item())
    else:
        stopping = not dctx.initialized and job.stop.signum is not None
    if stopping:
        return "signal"
    if job.args.max_steps is not None and prog.step >= job.args.max_steps:
        return "max_steps"
    return None


def train_epoch(job: Setup, state: TrainState) -> str | None:
    """Collective. The epoch's remaining batches; returns why it stopped early, if it did (after a checkpoint
    when that was mid-epoch)."""
    args, prog, dctx = job.args, state.prog, job.dctx
    # This rank's share of the epoch's order; a resumed epoch starts at the first batch not yet trained.
    order = epoch_order(len(job.data.x_train), args.seed, prog.epoch)
    index = shard_batches(order, dctx.rank, dctx.world, args.batch_size)
    state.loss_acc.fill_(prog.loss_sum)
    state.t0, state.steps = time.perf_counter(), 0
    reason = None
    batches = job.feeder.batches(index, prog.batch)
    for x, y in batches:
        state.loss_acc += job.trainer.train_step(x, y, prog.step)
        prog.step += 1
        prog.batch += 1
        state.steps += 1
        reason = stop_reason(job, state)
        mid_epoch = prog.batch < job.steps_per_epoch
        if (reason and mid_epoch) or (args.checkpoint_every and prog.step % args.checkpoint_every == 0):
            book(state, args.batch_size * dctx.world)
            save_checkpoint(job, state)  # may move this rank's loss sum to rank 0
            state.loss_acc.fill_(prog.loss_sum)
            if reason and mid_epoch:
                break
    batches.close()  # stops the prefetch thread of an epoch left early
    book(state, args.batch_size * dctx.world)
    return reason


def book(state: TrainState, samples_per_step: int) -> None:
    """Fold the steps since the last call into the progress record (times, samples, loss sum)."""
    prog, done = state.prog, state.steps * samples_per_step
    dt = time.perf_counter() - state.t0
    prog.loss_sum = float(state.loss_acc)
    prog.loss_count += state.steps
    prog.epoch_samples += done
    prog.samples_total += done
    prog.epoch_seconds += dt
    prog.train_seconds_total += dt
    state.t0, state.steps = time.perf_counter(), 0


def end_epoch(job: Setup, state: TrainState) -> None:
    """Collective. Evaluate, record the epoch's metrics, checkpoint, and write the running outputs."""
    args, prog = job.args, state.prog
    sums = reduced_loss(job, state)
    train_loss = float(sums[0] / max(sums[1], 1))
    test_loss, test_acc = job.trainer.evaluate(job.x_test, job.y_test)
    lr = job.trainer.optimizer.param_groups[0]["lr"]
    row = {
        "epoch": prog.epoch + 1,
        "step": prog.step,
        "train_loss": round(train_loss, 5),
        "test_loss": round(test_loss, 5),
        "test_acc": round(test_acc, 5),
        "samples_per_s": round(prog.epoch_samples / max(prog.epoch_seconds, 1e-9), 1),
        "lr": lr,
        "seconds": round(prog.epoch_seconds, 3),
    }
    prog.history.append(row)
    if job.dctx.is_main:
        state.scalars = state.scalars or Scalars(job.outputs / "tb")
        state.scalars.add(row)
    prog.epoch += 1
    prog.batch = prog.epoch_samples = prog.loss_count = 0
    prog.loss_sum = prog.epoch_seconds = 0.0
    job.log(
        f"epoch {row['epoch']:>3}/{args.epochs}  step {row['step']:>6}  train_loss {train_loss:.4f}  "
        f"test_loss {test_loss:.4f}  test_acc {test_acc:.4f}  lr {lr:.4g}  "
        f"{row['samples_per_s']:.0f} samples/s  {row['seconds']:.1f} s",
        flush=True,
    )
    save_checkpoint(job, state)
    running = run_summary(job, state, "running")  # collective: gathers every rank's weights hash
    if job.dctx.is_main:  # outputs that are current after every epoch, should the run die later
        write_outputs(job.outputs, prog, running, job.title, curves=False)


# ---- step 4: the report
def run_summary(job: Setup, state: TrainState, status: str) -> dict:
    """Collective (gathers every rank's weights hash): what summary.json holds."""
    args, prog, dctx, data = job.args, state.prog, job.dctx, job.data
    hist = prog.history or []
    hashes = dctx.all_gather_object(weights_sha256(job.trainer.model))
    return {
        "status": status,
        "best_test_acc": max((m["test_acc"] for m in hist), default=None),
        "final_test_acc": hist[-1]["test_acc"] if hist else None,
        "final_test_loss": hist[-1]["test_loss"] if hist else None,
        "epochs": prog.epoch,
        "epochs_planned": args.epochs,
        "steps": prog.step,
        "steps_per_epoch": job.steps_per_epoch,
        "wall_seconds": round(time.perf_counter() - job.started, 3),
        "train_seconds": round(prog.train_seconds_total, 3),
        "samples_per_s": round(prog.samples_total / max(prog.train_seconds_total, 1e-9), 1),
        "device": job.describe,
        "data": data.name,
        "train_samples": len(data.x_train),
        "test_samples": len(data.x_test),
        "world_size": dctx.world,
        "weights_sha256": hashes[0],
        "weights_sha256_per_rank": hashes,
        "torch": torch.__version__,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }


def finish(job: Setup, state: TrainState, status: str, code: int) -> int:
    """Collective. Write the final outputs (metrics, summary, curves) and return the exit code."""
    s = run_summary(job, state, status)
    if job.dctx.is_main:
        write_outputs(job.outputs, state.prog, s, job.title, curves=True)
    job.dctx.barrier()  # no rank exits (and tears down the group) before rank 0 has written
    return code


def exit_for(job: Setup, state: TrainState, reason: str) -> int:
    """Collective. Say why the run stops early (the checkpoint is saved by then), finish, return the code."""
    args, prog = job.args, state.prog
    if reason == "max_steps":
        job.log(
            f"stopped at --max-steps {args.max_steps} (step {prog.step}); checkpoint in {job.ckpt_path}",
            flush=True,
        )
        return finish(job, state, "stopped_max_steps", 0)
    signum = job.stop.signum if job.stop.signum is not None else signal.SIGTERM
    job.log(
        f"received {signal.Signals(signum).name}: checkpoint saved at step {prog.step} in {job.ckpt_path}",
        flush=True,
    )
    return finish(job, state, "interrupted", EXIT_SIGNAL.get(signum, 143))


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # An explicit --data cifar10 fails when CIFAR-10 cannot be had; the default falls back to digits.
    args.data_explicit = args.data is not None
    args.data = args.data or "cifar10"
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    stop = StopFlag()
    stop.install()
    dctx = DistContext()
    code = 1
    try:
        code = run(args, stop, dctx)
    except UsageError as e:
        if dctx.is_main:
            print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        code = 130
    finally:
        distributed = dctx.initialized
        gc.collect()  # drop DDP and pending collective work before the process group goes
        dctx.close()
    if distributed:
        # Gloo/NCCL worker threads can abort the process during interpreter teardown
        # ("terminate called without an active exception"); everything is written and closed: leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
