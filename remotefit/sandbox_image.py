"""The sandbox's node image: a Debian root filesystem that plays the role of the CPU AMI.

Built once per machine with debootstrap from Debian's packages and cached outside the clone
(``$REMOTEFIT_CACHE`` or ``~/.cache/remotefit``), in a folder named for the recipe's hash, so a changed
recipe builds a new image and an old one is never half-reused. What a stock Ubuntu cloud image has and our
user data relies on is in it: systemd, openssh-server, python3 (no venv, no pip, no `python`, as on
Ubuntu), cloud-init with the NoCloud datasource, sudo, ca-certificates. Nodes have no route out, so what
the boot script installs comes from a local apt repository baked into the image (the .debs of
python3-venv, python3-pip and python-is-python3), and pip reads a wheelhouse on this machine that each
node mounts read-only (`wheelhouse`): the real apt and pip steps run, offline.

A second variant, `dl`, plays the Deep Learning AMI's layout: the CPU image plus a venv at /opt/pytorch
holding this machine's PyTorch build (a CPU build: CUDA is absent, and `inv fit --gpu` says so), so the GPU
profile's code paths (the image's Python, a job venv over its packages) run too. GPU instance types boot it.

Each node boots a copy-on-write overlay of this folder (sandbox_machine.py); the image is never written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from remotefit.errors import UserError
from remotefit.proc import atomic_write, locked

SUITE = "bookworm"
MIRROR_ENV = "REMOTEFIT_DEBIAN_MIRROR"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# debootstrap resolves no virtual packages (cloud-init's python3-cryptography needs one): cloud-init goes in
# with apt-get afterwards.
BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "python3",
    "ca-certificates",
    "sudo",
    "iproute2",
    "procps",
    "apt-utils",
    "rsync",  # what a stock Ubuntu cloud image has and the laptop's sync relies on
    "curl",
)
APT_PACKAGES = ("cloud-init", "locales")
# What templates/user_data.sh.tftpl installs on a stock image: kept as .debs in the image's local repo.
BOOT_PACKAGES = ("python3-venv", "python3-pip", "python-is-python3")
LOCAL_REPO = "/opt/remotefit-apt"
WHEELS_MOUNT = "/opt/remotefit-wheels"  # where each node sees the wheelhouse (read-only)
# What the node's cloud-init does differently from Debian's defaults: the NoCloud seed only, no network
# config of its own (the sandbox gives the address, as EC2's DHCP does), Ubuntu's default user, the host
# key the sandbox keeps per instance (so `accept-new` holds across a restart), and /etc/hosts left to the
# sandbox, which resolves the node's name to its private IP as the VPC's DNS does (Debian's
# manage_etc_hosts says 127.0.1.1, and gloo then tells its peers to connect there).
CLOUD_CFG = """\
# remotefit sandbox image: how this cloud-init differs from Debian's defaults
datasource_list: [ NoCloud, None ]
network: {config: disabled}
manage_etc_hosts: false
locale: C.UTF-8
ssh_deletekeys: false
ssh_genkeytypes: []
system_info:
  default_user:
    name: ubuntu
    lock_passwd: true
    gecos: Ubuntu
    groups: [adm, sudo]
    sudo: ["ALL=(ALL) NOPASSWD:ALL"]
    shell: /bin/bash
"""
# pip on the nodes: the wheelhouse only (global config, so neither the boot script's /etc/pip.conf nor a
# job's venv sends pip to the internet it cannot reach).
PIP_CONF = f"[global]\nno-index = true\nfind-links = {WHEELS_MOUNT}\n"
# The node-side tools' venv (user data: boto3==<pin>); the pin lives in templates/main.tf.j2.
WHEELHOUSE_REQUIREMENTS = ("boto3==1.44.8",)
CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C",
    "DEBIAN_FRONTEND": "noninteractive",
}


def cache_dir() -> Path:
    return Path(os.environ.get("REMOTEFIT_CACHE") or Path.home() / ".cache" / "remotefit")


VARIANTS = ("cpu", "dl")
DL_VENV = "/opt/pytorch"  # where the Deep Learning AMI keeps PyTorch


def torch_requirement() -> str | None:
    """This machine's PyTorch, as the dl image installs it ("torch==2.13.0+cpu"), or None without one."""
    from importlib import metadata

    try:
        return f"torch=={metadata.version('torch')}"
    except metadata.PackageNotFoundError:
        return None


def variant_for(instance_type: str) -> str:
    from remotefit.cost import is_gpu_type

    return "dl" if is_gpu_type(instance_type) else "cpu"


def recipe(variant: str = "cpu") -> dict[str, object]:
    if variant == "dl":
        return {"base": recipe("cpu"), "venv": DL_VENV, "torch": torch_requirement(), "version": 1}
    return {
        "suite": SUITE,
        "base": BASE_PACKAGES,
        "apt": APT_PACKAGES,
        "boot": BOOT_PACKAGES,
        "cloud_cfg": CLOUD_CFG,
        "pip": PIP_CONF,
        "version": 1,  # bump when the build steps change
    }


def recipe_key(variant: str = "cpu") -> str:
    return hashlib.sha256(json.dumps(recipe(variant), sort_keys=True).encode()).hexdigest()[:12]


def image_dir(cache: Path | None = None, variant: str = "cpu") -> Path:
    return (cache or cache_dir()) / "images" / f"debian-{SUITE}-{variant}-{recipe_key(variant)}"


def build_log(cache: Path | None = None, variant: str = "cpu") -> Path:
    img = image_dir(cache, variant)
    return img.with_name(img.name + ".log")


def ready(cache: Path | None = None, variant: str = "cpu") -> bool:
    return (image_dir(cache, variant) / ".remotefit-image").exists()


def debootstrap_argv(target: Path, mirror: str) -> list[str]:
    return ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, str(target), mirror]


def chroot_argv(root: Path, *argv: str) -> list[str]:
    """argv run in the root with its own /proc, in private mount and pid namespaces (nothing stays mounted)."""
    return ["unshare", "--mount", "--pid", "--fork", f"--mount-proc={root}/proc", "chroot", str(root), *argv]


def build_steps(root: Path, mirror: str) -> list[tuple[str, list[str]]]:
    """The build, as (what, argv) in order; the files written between steps are in `_configure`."""
    repo = f"{root}{LOCAL_REPO}"
    apt = ["apt-get", "-q", "-y", "--no-install-recommends"]
    return [
        ("debootstrap", debootstrap_argv(root, mirror)),
        ("apt-get update", chroot_argv(root, "apt-get", "-q", "update")),
        (f"installing {' '.join(APT_PACKAGES)}", chroot_argv(root, *apt, "install", *APT_PACKAGES)),
        ("apt-get clean", chroot_argv(root, "apt-get", "clean")),
        (f"downloading {' '.join(BOOT_PACKAGES)}", chroot_argv(root, *apt, "install", "-d", *BOOT_PACKAGES)),
        (
            "local apt repository",
            ["sh", "-c", f'mkdir -p "{repo}" && mv "{root}"/var/cache/apt/archives/*.deb "{repo}"/'],
        ),
        ("indexing it", chroot_argv(root, "sh", "-c", f"cd {LOCAL_REPO} && apt-ftparchive packages . > Packages")),
    ]


def dl_steps(base: Path, root: Path, torch: str, house: Path) -> list[tuple[str, list[str]]]:
    """The dl variant: the CPU image, then PyTorch in its own venv at DL_VENV from the wheelhouse (copied in
    for the build, then removed), as the Deep Learning AMI has it."""
    apt = ["apt-get", "-q", "-y", "--no-install-recommends"]
    wheels = "/tmp/remotefit-wheels"
    pip = [f"{DL_VENV}/bin/pip", "install", "-q", "--no-index", "--find-links", wheels, torch, "numpy"]
    return [
        ("copying the CPU image", ["cp", "-a", "--reflink=auto", str(base), str(root)]),
        ("apt-get update", chroot_argv(root, "apt-get", "-q", "update")),
        ("installing python3-venv", chroot_argv(root, *apt, "install", "python3-venv")),
        ("copying the wheelhouse", ["cp", "-a", str(house), f"{root}{wheels}"]),
        (f"the PyTorch venv ({DL_VENV})", chroot_argv(root, "python3", "-m", "venv", DL_VENV)),
        (f"installing {torch}", chroot_argv(root, *pip)),
        ("removing the wheels", ["rm", "-rf", f"{root}{wheels}", f"{root}/root/.cache/pip"]),
    ]


def _configure(root: Path) -> None:
    """Files that make the root an image: cloud-init's config, apt on the local repo, pip on the wheelhouse,
    no host keys of its own (each node gets the one the sandbox keeps for its instance)."""
    (root / "etc/cloud/cloud.cfg.d/90-remotefit-sandbox.cfg").write_text(CLOUD_CFG)
    (root / "etc/apt/sources.list").write_text(f"deb [trusted=yes] file:{LOCAL_REPO} ./\n")
    for stale in (root / "etc/apt/sources.list.d").glob("*"):
        stale.unlink()
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    (root / "etc/xdg/pip").mkdir(parents=True, exist_ok=True)
    (root / "etc/xdg/pip/pip.conf").write_text(PIP_CONF)
    (root / WHEELS_MOUNT.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    # No network to sync the clock from, nor to fetch updates from: off, as they only fail.
    # A console login would take the console over (its output is the node's console log); EC2 has none.
    for unit in ("apt-daily.timer", "apt-daily-upgrade.timer", "console-getty.service"):
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    (root / "etc/machine-id").write_text("")  # systemd makes one per boot, as on a fresh instance


def discard(tmp: Path) -> None:
    """Remove a half-built image. A build killed mid-way (Ctrl-C, a stopped bootstrap) leaves debootstrap's
    /proc and /sys mounted in it: unmount those first, or removing the folder would walk into them."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        mounts = []
    inside = [m.split()[1] for m in mounts if len(m.split()) > 1 and m.split()[1].startswith(f"{tmp}/")]
    for point in sorted(inside, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)  # noqa: S603, S607
    shutil.rmtree(tmp, ignore_errors=True)


def ensure_image(cache: Path | None = None, echo: bool = True, variant: str = "cpu") -> Path:
    """The cached image, built first if missing (a lock keeps two builders apart). A failed build is
    one line with its log's path; nothing half-built is ever used."""
    base = ensure_image(cache, echo, "cpu") if variant == "dl" else None  # before the lock: it takes it too
    img = image_dir(cache, variant)
    img.parent.mkdir(parents=True, exist_ok=True)
    with locked(img.parent / ".build.lock"):
        if ready(cache, variant):
            return img
        if shutil.which("debootstrap") is None:
            raise UserError("debootstrap not found: the sandbox's node image needs it (apt-get install debootstrap)")
        torch = torch_requirement()
        if base is not None and torch is None:
            raise UserError(
                "GPU sandbox nodes boot the dl image, which needs PyTorch in this venv: run scripts/bootstrap "
                "--sandbox, or use CPU nodes"
            )
        log = build_log(cache, variant)
        tmp = img.with_name(img.name + ".tmp")
        discard(tmp)
        mirror = os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR
        if base is None:
            steps = build_steps(tmp, mirror)
        else:
            steps = dl_steps(base, tmp, str(torch), wheelhouse(cache, str(torch)))
        t0 = time.monotonic()
        if echo:
            print(f"sandbox: building the {variant} node image (once per machine, ~1-2 min; log: {log})", flush=True)
        with log.open("w") as fh:
            for what, argv in steps:
                fh.write(f"== {what}: {' '.join(argv)}\n")
                fh.flush()
                res = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, env=CHROOT_ENV, timeout=1800)  # noqa: S603
                if res.returncode != 0:
                    discard(tmp)
                    raise UserError(
                        f"the sandbox node image failed to build at '{what}' (exit {res.returncode}); "
                        f"see {log}; set {MIRROR_ENV} to a reachable Debian mirror, or use loopback nodes "
                        "(REMOTEFIT_SANDBOX_NODES=loopback)"
                    )
            if base is None:
                _configure(tmp)
            info = {"recipe": recipe(variant), "built_in_s": time.monotonic() - t0}
            (tmp / ".remotefit-image").write_text(json.dumps(info))
            fh.write(f"== built in {time.monotonic() - t0:.0f} s\n")
        os.rename(tmp, img)
        pruned = prune_images(img)
        if echo and pruned:
            print(f"sandbox: removed superseded node image(s) {', '.join(p.name for p in pruned)}", flush=True)
        return img


def in_use(img: Path, mounts: str) -> bool:
    """Whether a node's disk (an overlay with the image as its lower layer) is mounted from it."""
    return f"lowerdir={img}," in mounts or f"lowerdir={img} " in mounts or f"lowerdir={img}:" in mounts


def prune_images(current: Path) -> list[Path]:
    """Remove the images of the same variant built from older recipes (and their logs): each is ~0.5-1.3 GB
    and nothing boots them again. An image a running node's disk still sits on is left for next time."""
    stem = current.name.rsplit("-", 1)[0] + "-"
    try:
        mounts = Path("/proc/self/mounts").read_text()
    except OSError:
        return []  # cannot tell what is in use: keep everything
    pruned = []
    for old in current.parent.glob(stem + "*"):
        if old == current or not old.is_dir() or old.name.endswith(".tmp") or in_use(old, mounts):
            continue
        shutil.rmtree(old, ignore_errors=True)
        old.with_name(old.name + ".log").unlink(missing_ok=True)
        pruned.append(old)
    return pruned


def wheelhouse(cache: Path | None = None, *extra: str) -> Path:
    """Wheels the nodes install from (read-only at WHEELS_MOUNT), fetched once per set of requirements from
    this machine's package index: the tool venv's boto3, plus `extra` (the dl image's torch and numpy)."""
    house = (cache or cache_dir()) / "wheelhouse"
    wanted = (*WHEELHOUSE_REQUIREMENTS, *extra, *(["numpy"] if extra else []))
    key = hashlib.sha256(" ".join(wanted).encode()).hexdigest()[:12]
    failed = _download(house, key, ["--only-binary=:all:", *wanted])
    if failed:
        raise UserError(f"could not fill the sandbox's wheelhouse {house} ({' '.join(wanted)}): {failed}")
    return house


def _download(house: Path, key: str, args: list[str], cwd: Path | None = None) -> str | None:
    """`pip download ARGS` into the wheelhouse once per key (a stamp file), under a lock: two sandboxes
    may fill it at once. None when done, else pip's last line."""
    house.mkdir(parents=True, exist_ok=True)
    stamp = house / f".downloaded-{key}"
    if stamp.exists():
        return None
    with locked(house / ".download.lock"):
        if stamp.exists():
            return None
        argv = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "-d", str(house), *args]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=1200, cwd=cwd)  # noqa: S603
        if res.returncode != 0:
            return (res.stderr.strip().splitlines() or ["no output"])[-1]
        stamp.write_text("")
    return None


def wheels_for(requirements: Path, cache: Path | None = None) -> Path:
    """Put a job's requirements into the wheelhouse the container nodes install from. The nodes have no
    route out (a real node reaches PyPI; this machine reaches its package index, so it fetches for them);
    done once per content of the requirements file."""
    house = (cache or cache_dir()) / "wheelhouse"
    try:
        text = requirements.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {requirements}: {exc.strerror}") from None
    # For torch the wheelhouse offers this machine's own build (a CPU one): from PyPI, a range like
    # `torch>=2.1` takes a multi-GB CUDA build that a CPU node cannot use and that its pip would then install.
    pins = "".join(f"{pin}\n" for pin in [torch_requirement()] if pin)
    key = "req-" + hashlib.sha256(text + pins.encode()).hexdigest()[:12]
    args = ["--find-links", str(house), "-r", str(requirements)]
    if pins:
        house.mkdir(parents=True, exist_ok=True)
        atomic_write(house / f".constraints-{key}.txt", pins)
        args += ["-c", str(house / f".constraints-{key}.txt")]
    failed = _download(house, key, args, cwd=requirements.parent)
    if failed:
        raise UserError(
            f"{requirements}: could not fetch its packages for the sandbox's container nodes, which install "
            f"only from {house} ({failed}); fix the file, or use loopback nodes (REMOTEFIT_SANDBOX_NODES=loopback)"
        )
    return house


def prebuild() -> tuple[int, str]:
    """(exit code, one line) for `python -m remotefit.sandbox_image`: build the CPU node image now, where
    container nodes will boot it. scripts/bootstrap runs this beside its pip installs, so neither the first
    `inv apply` nor the test suite's first end-to-end tests wait the ~1-2 min of a build. Stdlib only: it
    runs before the venv exists."""
    from remotefit import sandbox_machine

    if os.environ.get("REMOTEFIT_SANDBOX_NODES", "").strip() == "loopback":
        return 0, "node image: not built (REMOTEFIT_SANDBOX_NODES=loopback)"
    why_not = sandbox_machine.available()
    if why_not is not None:
        return 0, f"node image: not built ({why_not}; the sandbox uses loopback nodes)"
    if ready():
        return 0, f"node image: ready ({image_dir()})"
    try:
        img = ensure_image(echo=False)
    except UserError as exc:
        return 1, f"node image: {exc.args[0]}"
    return 0, f"node image: built ({img})"


if __name__ == "__main__":
    code, line = prebuild()
    print(line, flush=True)
    sys.exit(code)
