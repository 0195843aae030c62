#!/usr/bin/env python3
"""remotefit node watchdog: make sure the node stops costing money, whatever the laptop does.

Run every minute by ``remotefit-watchdog.timer`` (as root, Type=oneshot):

    /usr/bin/python3 /opt/remotefit/watchdog.py --config /etc/remotefit/watchdog.json

or with ``--loop SECONDS`` where there is no systemd. ``remotefit-spot.service`` runs
``--spot-poll 5`` beside it: a long-lived loop that only watches for spot notices, every 5 s as AWS
recommends (a notice comes two minutes before the interruption; a minute timer would waste half). Standard
library only, Python 3.8+; it imports ``contract.py`` from its own folder (the active-run record, process
liveness, atomic writes and the config keys it shares with the runner and the laptop).

Config (JSON, written at boot by user_data; every key can also be given as a
flag, and flags win)::

    {"deadline_epoch": 1700000000, "idle_minutes": 30,
     "base": "/home/ubuntu/remotefit", "imds": "http://169.254.169.254",
     "state": "/var/lib/remotefit/watchdog-state.json",
     "shutdown_cmd": ["shutdown", "-h", "now"], "spot_service": true}

Each tick:

* Spot interruption: asks IMDSv2 for ``spot/instance-action``; when a notice is
  there, SIGTERMs the active run's process group once (remembered in the state
  file), so the job can checkpoint in its two minutes. With ``spot_service``
  the tick leaves this to the ``--spot-poll`` loop (its own state file, so the
  two never overwrite each other's records).
* Hard deadline: ``now >= deadline_epoch`` shuts the node down. The instance is
  launched with instance_initiated_shutdown_behavior=terminate, so shutting
  down terminates it. user_data ALSO runs ``shutdown -h +<minutes>`` at boot: a
  second, independent guard that needs neither this script nor its timer.
* Idle: the node is busy while ``<base>/active.json`` (written by runner.py)
  names a live process (the same pid AND start time: a recycled pid is not the
  run), or while someone uses the node: an interactive ssh
  login (``sshd: user@pts/N``), an ssh connection running a command
  (``sshd: user@notty`` with a child process: rsync, a follow, ``inv ssh CMD``),
  or an open SSM Session Manager session (one ``ssm-session-worker`` process
  each, shell or port forwarding alike: a person is on the node). An
  ``@notty`` connection with no child is an idle ssh ControlMaster (ours
  persists 10 minutes after the last command): it does not count. Idle for
  ``idle_minutes`` since max(boot or first tick, last busy) shuts the node down.

One line per tick goes to stdout (the journal) saying what was decided
(``action=keep|shutdown decision=busy|waiting|idle|deadline``) and why. A tick
never crashes on a bad config, an unwritable state file or an unreachable IMDS:
the deadline and idle checks must still happen. Exit 0; a tick that crashes
anyway logs ``watchdog: error: tick crashed`` to stderr and exits 3 (the unit
takes 3 as success, so the timer's next tick still runs).

For tests: ``--now EPOCH`` or $REMOTEFIT_FAKE_NOW fake the clock, ``--proc``
points at a fake /proc, ``--shutdown-cmd`` replaces the shutdown command and
``--dry-run`` decides without acting.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # contract.py lies beside this file
import contract  # noqa: E402

DEFAULTS = contract.WATCHDOG_DEFAULTS
DEFAULT_CONFIG = "/etc/remotefit/watchdog.json"
# Exit code of a crashed tick: distinct from 0 (a decision was made) and from argparse's 2; the unit
# lists it in SuccessExitStatus so the timer's next tick runs as usual while the journal shows the crash.
TICK_CRASHED = 3
SSH_SESSION_PREFIXES = ("sshd: ", "sshd-session: ")  # OpenSSH >= 9.8 renamed the per-session binary
SSM_SESSION_WORKER = "ssm-session-worker"  # the SSM agent starts one per Session Manager session
JOURNAL_SOCKET = "/dev/log"  # journald's syslog socket
SPOT_POLL_DEFAULT = 5.0  # seconds; AWS recommends polling spot/instance-action every 5 s


def log(msg: str) -> None:
    print("watchdog: " + msg, flush=True)


def to_journal(opts: argparse.Namespace, msg: str) -> str:
    """`log(msg)`, and the same line to the node's journal (syslog) when stdout does not already go there
    ($JOURNAL_STREAM unset: a tick run by hand over ssh, whose session the shutdown may end before its
    last lines leave). Returns msg."""
    log(msg)
    if opts.journal and not os.environ.get("JOURNAL_STREAM") and os.path.exists(JOURNAL_SOCKET):
        try:
            import syslog

            syslog.openlog("remotefit-watchdog", 0, syslog.LOG_DAEMON)
            syslog.syslog(syslog.LOG_NOTICE, "watchdog: " + msg)
        except OSError:
            pass  # the line is on stdout; a journal that cannot take it must not stop the shutdown
    return msg


def warn(msg: str) -> None:
    print("watchdog: warning: " + msg, file=sys.stderr, flush=True)


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def minutes(seconds: float) -> str:
    m = seconds / 60.0
    return f"{m:.1f}min" if abs(m) < 120 else f"{m / 60.0:.1f}h"


# --------------------------------------------------------------------------- config / state


def load_config(path: str | None, explicit: bool) -> dict:
    """Config file merged over defaults; problems are warnings, never fatal."""
    cfg = dict(DEFAULTS)
    if not path:
        return cfg
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        if explicit:
            warn(f"config {path} not found; using defaults and flags")
        return cfg
    except (OSError, ValueError) as exc:
        # A broken config must not disable the guard: fall back to defaults.
        warn(f"cannot read config {path} ({exc}); using defaults and flags")
        return cfg
    cfg.update({k: v for k, v in data.items() if k in DEFAULTS})
    return cfg


def parse_shutdown_cmd(value: object) -> list[str]:
    if isinstance(value, list) and value and all(isinstance(x, str) for x in value):
        return value
    if isinstance(value, str) and value.strip():
        # A flag may carry a JSON list or a plain shell-style string.
        if value.lstrip().startswith("["):
            with contextlib.suppress(ValueError):
                return parse_shutdown_cmd(json.loads(value))
        return shlex.split(value)
    warn(f"invalid shutdown_cmd {value!r}; using {DEFAULTS['shutdown_cmd']}")
    return list(DEFAULTS["shutdown_cmd"])


def as_float(value: object, name: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        warn(f"invalid {name} {value!r}; ignored")
        return None


def load_state(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def save_state(path: str, state: dict) -> None:
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        contract.write_json(path, state)
    except OSError as exc:
        warn(f"cannot write state {path} ({exc})")


# --------------------------------------------------------------------------- observations


def read_first_line(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().strip() or None
    except OSError:
        return None


def init_start(proc: str) -> int | None:
    """When PID 1 started, in clock ticks since the kernel booted (field 22 of its stat)."""
    try:
        with open(os.path.join(proc, "1", "stat")) as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def boot_time(proc: str, now: float) -> float | None:
    """When this machine booted: when its init started (the kernel's boot time plus PID 1's start). On a VM
    that is the kernel's boot within a second; in a container (the sandbox's nodes) /proc/uptime is the
    host's, and only PID 1's start says when the node booted."""
    start = init_start(proc)
    btime = None
    try:
        with open(os.path.join(proc, "stat")) as f:
            btime = next((int(ln.split()[1]) for ln in f if ln.startswith("btime ")), None)
    except (OSError, ValueError, IndexError):
        btime = None
    if start is not None and btime is not None:
        return btime + start / os.sysconf("SC_CLK_TCK")
    up = read_first_line(os.path.join(proc, "uptime"))
    try:
        return now - float(up.split()[0]) if up else None
    except (ValueError, IndexError):
        return None


def active_run(base: str, proc: str) -> dict | None:
    """The run named by base/active.json if its process is alive (pid and start time)."""
    return contract.live_active(base, proc)


def parent_of(proc: str, pid: str) -> str | None:
    st = read_stat(proc, pid)
    return st[1] if st else None


def descends_from(proc: str, pid: str, ancestor: str) -> bool:
    for _ in range(64):  # bounded: a broken chain must not loop
        if pid == ancestor:
            return True
        parent = parent_of(proc, pid)
        if parent in (None, "0", pid):
            return False
        pid = parent
    return False


def read_stat(proc: str, pid: str) -> tuple[str, str] | None:
    """(state, parent pid) of a process, or None when it is gone."""
    try:
        with open(os.path.join(proc, pid, "stat")) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], fields[1]
    except (OSError, IndexError):
        return None


def live_parents(proc: str, pids: list[str]) -> set[str]:
    """The pids that have at least one live (non-zombie) child."""
    out = set()
    for pid in pids:
        st = read_stat(proc, pid)
        if st and st[0] not in ("Z", "X"):
            out.add(st[1])
    return out


def ssh_sessions(proc: str, listener: str | None = None) -> list[str]:
    """What keeps the node in use: interactive ssh logins ("sshd: ubuntu@pts/0"), ssh connections
    running a command ("sshd: ubuntu@notty" with a child), SSM sessions ("ssm-session-worker ...").
    An @notty connection without a child is an idle ssh ControlMaster: not a session. With `listener`
    (an sshd pid), only its sessions count: a sandbox node shares the host with other sshds."""
    found = []
    try:
        names = [n for n in os.listdir(proc) if n.isdigit()]
    except OSError as exc:
        warn(f"cannot list {proc} ({exc})")
        return found
    parents = None
    for name in names:
        try:
            with open(os.path.join(proc, name, "cmdline"), "rb") as f:
                raw = f.read()
        except OSError:
            continue  # process exited meanwhile
        title = raw.replace(b"\0", b" ").decode("utf-8", "replace").strip()
        if title.startswith(SSH_SESSION_PREFIXES) and "@" in title:
            if listener and not descends_from(proc, name, listener):
                continue
            if title.endswith("@notty"):
                if parents is None:
                    parents = live_parents(proc, names)
                if name not in parents:
                    continue  # an idle multiplexing master, kept open by ControlPersist
            found.append(title)
        elif os.path.basename(title.split(" ", 1)[0]) == SSM_SESSION_WORKER and not listener:
            found.append("ssm " + title.split(" ", 2)[1] if " " in title else "ssm session")
    return sorted(found)


def spot_notice(imds: str, timeout: float) -> tuple[str, dict | None]:
    """('none'|'notice'|'error: ...', notice) from IMDSv2 spot/instance-action."""
    # No proxies: an http_proxy in the environment must not swallow IMDS calls.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    base = imds.rstrip("/")
    if not base.startswith(("http://", "https://")):
        return f"error: imds must be an http(s) URL, got {imds!r}", None
    try:
        # The scheme is checked above: only http(s) reaches urlopen.
        req = urllib.request.Request(  # noqa: S310
            base + "/latest/api/token",
            method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"},
        )
        with opener.open(req, timeout=timeout) as resp:
            token = resp.read().decode().strip()
        req = urllib.request.Request(  # noqa: S310
            base + "/latest/meta-data/spot/instance-action",
            headers={"X-aws-ec2-metadata-token": token},
        )
        with opener.open(req, timeout=timeout) as resp:
            body = resp.read().decode()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return "none", None
        return f"error: IMDS HTTP {exc.code}", None
    except (OSError, ValueError) as exc:  # URLError, timeouts, resets
        reason = getattr(exc, "reason", exc)
        return f"error: IMDS unreachable ({reason})", None
    try:
        notice = json.loads(body)
    except ValueError:
        return f"error: IMDS returned non-JSON instance-action {body[:80]!r}", None
    return "notice", notice if isinstance(notice, dict) else {"raw": notice}


def last_words(opts: argparse.Namespace, run: dict, state: dict) -> str:
    """Before a shutdown with a run still active: SIGTERM its job (once, as a spot notice does) so it
    can checkpoint, then wait (bounded) until its supervisor has done the final upload and cleared
    active.json. What the run produced is in the bucket before the disk goes."""
    run_id, pgid = run.get("run_id"), run.get("pgid") or run.get("pid")
    key = f"{run_id}:{run.get('pid')}"
    forwarded = key in (state.get("spot_forwarded"), load_state(spot_state_path(opts.state)).get("spot_forwarded"))
    what = "its job already had a spot notice's SIGTERM" if forwarded else "its job has exited"
    if not forwarded and contract.pid_alive(run.get("pid"), run.get("pid_start"), opts.proc):
        try:
            os.killpg(int(pgid), signal.SIGTERM)
            what = f"sent SIGTERM to its process group {pgid}"
        except (OSError, TypeError, ValueError) as exc:
            what = f"SIGTERM to process group {pgid} failed: {exc}"
    wait = float(opts.final_wait_s or 0)
    log(f"run {run_id} is active: {what}; waiting up to {wait:g}s for its final upload before shutting down")
    start = time.monotonic()
    while active_run(opts.base, opts.proc) is not None and time.monotonic() - start < wait:
        time.sleep(0.5)
    took = time.monotonic() - start
    if active_run(opts.base, opts.proc) is None:
        return f"run {run_id} ended and its final upload is done after {took:.1f}s"
    return f"run {run_id} still active after {took:.1f}s: shutting down anyway (the deadline is hard)"


def run_shutdown(cmd: list[str]) -> str:
    try:
        out = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"shutdown command failed: {exc}"
    if out.returncode != 0:
        return f"shutdown command exited {out.returncode}: {out.stdout.strip()[:200]}"
    return "shutdown command ran"


# --------------------------------------------------------------------------- spot


def check_spot(opts: argparse.Namespace, state: dict, now: float, run: dict | None) -> str:
    """Ask IMDS for a spot notice; on one, SIGTERM the active run's process group once (recorded in
    `state`). Returns a "spot=..." word for the log line."""
    try:
        spot, notice = spot_notice(opts.imds, opts.imds_timeout)
    except Exception as exc:  # whatever IMDS does, the caller's other checks must run
        spot, notice = f"error: {type(exc).__name__}: {exc}", None
    if spot == "none":
        return "spot=none"
    if spot != "notice":
        return "spot=" + spot
    what = f"{notice.get('action')} at {notice.get('time')}"
    run_id = run.get("run_id") if run else None
    key = f"{run_id}:{run.get('pid')}" if run else None
    if run is None:
        return f"spot=notice({what}; no active run)"
    if state.get("spot_forwarded") == key:
        return f"spot=notice({what}; SIGTERM already sent to run {run_id})"
    pgid = run.get("pgid") or run.get("pid")
    if opts.dry_run:
        return f"spot=notice({what}; would SIGTERM process group {pgid})"
    try:
        os.killpg(int(pgid), signal.SIGTERM)
        out = f"spot=notice({what}; sent SIGTERM to run {run_id}, process group {pgid})"
    except (OSError, TypeError, ValueError) as exc:
        out = f"spot=notice({what}; SIGTERM to {pgid} failed: {exc})"
    try:  # beside the run, for its status: interrupted, not failed
        contract.write_json(contract.spot_notice_path(opts.base, str(run_id)), {"notice": notice, "forwarded_at": now})
    except (OSError, TypeError) as exc:
        out += f" (notice not recorded for the run: {exc})"
    state["spot_forwarded"] = key
    state["spot_forwarded_at"] = now
    return out


def spot_state_path(state_path: str) -> str:
    """The spot loop's own state file: the minute tick rewrites the main one (idle clock)."""
    root, ext = os.path.splitext(state_path)
    return f"{root}-spot{ext or '.json'}"


def spot_poll(args: argparse.Namespace, every: float) -> int:
    """`--spot-poll SECONDS`: watch for spot notices forever (remotefit-spot.service). Logs a line
    when the answer changes, not every poll; a failed poll is logged and the loop goes on."""
    polls, last = 0, None
    while True:
        try:
            opts = resolve(args)
            now = clock(args)
            path = spot_state_path(opts.state)
            state = load_state(path)
            before = dict(state)
            word = check_spot(opts, state, now, active_run(opts.base, opts.proc))
            if state != before and not opts.dry_run:
                save_state(path, state)
        except Exception as exc:  # the loop must outlive any one bad poll
            word = f"spot=error: poll failed: {type(exc).__name__}: {exc}"
        if word != last:
            log(f"{iso(time.time())} {word} (polling every {every:g}s)")
            last = word
        polls += 1
        if args.max_ticks and polls >= args.max_ticks:
            return 0
        time.sleep(max(0.05, every))


# --------------------------------------------------------------------------- tick


def tick(opts: argparse.Namespace, now: float) -> str:
    """One decision; returns the action ('keep' or 'shutdown')."""
    state = this_boots_state(opts, now)
    # Spot interruption first: it is the most time-critical.
    run = active_run(opts.base, opts.proc)
    parts = ["spot=polled-by-service" if opts.spot_service else check_spot(opts, state, now, run)]

    # Busy = live run or a logged-in ssh user.
    sessions = ssh_sessions(opts.proc, str(opts.sshd_pid) if opts.sshd_pid else None)
    busy = []
    if run is not None:
        busy.append(f"run {run.get('run_id')} (pid {run.get('pid')})")
    if sessions:
        busy.append(f"{len(sessions)} session(s): " + ", ".join(sessions[:3]))
    if busy:
        state["last_busy"] = now
    idle_ref = max(state["first_tick"], state.get("last_busy") or state["first_tick"])
    action, decision, reason = decide(opts, now, busy, max(0.0, now - idle_ref))

    state["last_tick"] = now
    state["last_action"] = action
    state["last_decision"] = decision
    if action == "shutdown":
        state.setdefault("shutdown_first_requested_at", now)
    if not opts.dry_run:
        save_state(opts.state, state)

    result = ""
    if action == "shutdown":
        if opts.dry_run:
            result = f" (dry run: not running {shlex.join(opts.shutdown_cmd)})"
        else:
            # Logged before acting: the shutdown may take this process with it.
            to_journal(opts, f"{iso(now)} action=shutdown decision={decision} reason={reason} {' '.join(parts)}")
            if run is not None:
                to_journal(opts, last_words(opts, run, state))
            to_journal(opts, f"running {shlex.join(opts.shutdown_cmd)}: {run_shutdown(opts.shutdown_cmd)}")
            return action
    log(f"{iso(now)} action={action} decision={decision} reason={reason} {' '.join(parts)}{result}")
    return action


def this_boots_state(opts: argparse.Namespace, now: float) -> dict:
    """The saved state, emptied on a new boot (last boot's idle clock and spot flags mean nothing), with
    the moment idle counts from."""
    state = load_state(opts.state)
    boot_id = read_first_line(os.path.join(opts.proc, "sys", "kernel", "random", "boot_id"))
    if boot_id and init_start(opts.proc) is not None:
        boot_id += f":{init_start(opts.proc)}"  # a container's boot shares the host kernel's boot_id
    if boot_id and state.get("boot_id") not in (None, boot_id):
        state = {}
    if boot_id:
        state["boot_id"] = boot_id
    if "first_tick" not in state:
        # Idle counts from boot when known (ticks start a minute after it); a sandbox node, which
        # shares the host's kernel, says when it started instead.
        boot = float(opts.started_epoch) if opts.started_epoch else boot_time(opts.proc, now)
        state["first_tick"] = boot if boot is not None and boot <= now else now
    return state


def decide(opts: argparse.Namespace, now: float, busy: list[str], idle_for: float) -> tuple[str, str, str]:
    """(action, the rule that decided, the reason in words): deadline or idle -> shutdown; busy or
    waiting -> keep."""
    if opts.deadline_epoch is not None and now >= opts.deadline_epoch:
        action, decision = "shutdown", "deadline"
        reason = f"deadline {iso(opts.deadline_epoch)} passed {minutes(now - opts.deadline_epoch)} ago"
    elif not busy and opts.idle_minutes is not None and opts.idle_minutes > 0 and idle_for >= opts.idle_minutes * 60:
        action, decision = "shutdown", "idle"
        reason = f"idle for {minutes(idle_for)} >= {opts.idle_minutes:g}min (no active run, no session)"
    elif busy:
        action, decision = "keep", "busy"
        reason = "busy: " + ", ".join(busy)
    else:
        action, decision = "keep", "waiting"
        limit = f"{opts.idle_minutes:g}min" if opts.idle_minutes else "(idle check off)"
        reason = f"idle for {minutes(idle_for)} of {limit}"
    if action == "keep" and opts.deadline_epoch is not None:
        reason += f"; deadline in {minutes(opts.deadline_epoch - now)}"
    elif opts.deadline_epoch is None:
        reason += "; no deadline set"
    return action, decision, reason


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="watchdog", description=__doc__.splitlines()[0])
    p.add_argument("--config", help=f"JSON config (default {DEFAULT_CONFIG})")
    p.add_argument("--deadline-epoch", help="unix time at which the node shuts down regardless")
    p.add_argument("--idle-minutes", help="shut down after this many idle minutes (0: never)")
    p.add_argument("--base", help="remotefit work directory holding active.json")
    p.add_argument("--imds", help="instance metadata endpoint (default http://169.254.169.254)")
    p.add_argument("--state", help="state file (last busy time, spot notice forwarded)")
    p.add_argument("--shutdown-cmd", help='command as JSON list (\'["shutdown","-h","now"]\') or shell words')
    p.add_argument("--sshd-pid", type=int, help="count only ssh sessions of this sshd listener (sandbox nodes)")
    p.add_argument("--started-epoch", help="when the node started (default: boot time from /proc/uptime)")
    p.add_argument("--proc", default="/proc", help="proc root to scan for ssh sessions (tests)")
    p.add_argument("--now", type=float, help="fake current unix time (tests; also $REMOTEFIT_FAKE_NOW)")
    p.add_argument("--imds-timeout", type=float, default=2.0, help="seconds per IMDS request")
    p.add_argument("--loop", type=float, metavar="SECONDS", help="tick forever every SECONDS (no systemd)")
    p.add_argument(
        "--spot-poll",
        type=float,
        metavar="SECONDS",
        help=f"only watch for spot notices, every SECONDS, forever (remotefit-spot.service; {SPOT_POLL_DEFAULT:g} s)",
    )
    p.add_argument("--max-ticks", type=int, default=0, help=argparse.SUPPRESS)  # bounds --loop in tests
    p.add_argument("--dry-run", action="store_true", help="print the decision without acting")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Merge defaults < config file < flags into the options a tick uses."""
    cfg = load_config(args.config or DEFAULT_CONFIG, explicit=args.config is not None)
    for key in DEFAULTS:
        flag = getattr(args, key, None)
        if flag is not None:
            cfg[key] = flag
    opts = argparse.Namespace(**vars(args))
    opts.deadline_epoch = as_float(cfg["deadline_epoch"], "deadline_epoch")
    opts.idle_minutes = as_float(cfg["idle_minutes"], "idle_minutes")
    opts.base = str(cfg["base"])
    opts.imds = str(cfg["imds"])
    opts.state = str(cfg["state"])
    opts.shutdown_cmd = parse_shutdown_cmd(cfg["shutdown_cmd"])
    opts.started_epoch = as_float(cfg.get("started_epoch"), "started_epoch")
    opts.spot_service = cfg.get("spot_service") is True
    opts.final_wait_s = as_float(cfg.get("final_wait_s"), "final_wait_s") or 0.0
    opts.journal = cfg.get("journal") is not False
    return opts


def clock(args: argparse.Namespace) -> float:
    if args.now is not None:
        return args.now
    fake = os.environ.get("REMOTEFIT_FAKE_NOW")
    if fake:
        with contextlib.suppress(ValueError):
            return float(fake)
    return time.time()


def main(argv: list[str] | None = None) -> int:
    """Tick once (or every --loop seconds); exit TICK_CRASHED when the (last) tick crashed, else 0."""
    args = build_parser().parse_args(argv)
    if args.spot_poll is not None:
        return spot_poll(args, args.spot_poll)
    ticks = 0
    while True:
        try:
            tick(resolve(args), clock(args))
            code = 0
        except Exception as exc:  # a crashed tick must not kill the loop, but it must not pass for a decision
            code = TICK_CRASHED
            print(
                f"watchdog: error: tick crashed, nothing decided: {type(exc).__name__}: {exc}",
                file=sys.stderr,
                flush=True,
            )
        ticks += 1
        if args.loop is None or (args.max_ticks and ticks >= args.max_ticks):
            return code
        time.sleep(max(1.0, args.loop) if not args.max_ticks else args.loop)


if __name__ == "__main__":
    sys.exit(main())
