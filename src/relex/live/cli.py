"""``relex watch``: follow a run folder a trainer is still writing, with a live line of diagnostics."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from relex.trajectory.discover import MAX_STEP
from relex.verify import add_verify_arguments, verify_options

if TYPE_CHECKING:
    from relex.live.watcher import Watcher

A_DAY = 86400.0  # seconds: the longest --poll or --settle taken (time.sleep overflows far beyond)


def bounded(convert: Callable[[str], float], low: float, high: float, what: str) -> Callable[[str], float]:
    """An argparse type: ``convert(text)`` if it is finite and within [low, high], else one line saying ``what``."""
    def parse(text: str) -> float:
        try:
            value = convert(text)
            taken = math.isfinite(value) and low <= value <= high
        except (ValueError, OverflowError):  # not a number; an int too large for a float
            taken = False
        if not taken:
            raise argparse.ArgumentTypeError(f"{text!r}: {what}")
        return value
    return parse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``watch`` subcommand to a ``relex`` argparse subparsers object."""
    w = subparsers.add_parser("watch", help="follow a run while it trains: live diagnostics, safe horizon, "
                                            "predictions rewritten as checkpoints arrive")
    w.add_argument("--base", required=True, type=Path, help="base model folder (theta_0)")
    w.add_argument("--run", required=True, type=Path, help="run folder the trainer writes checkpoints to")
    w.add_argument("--target", type=bounded(int, 1, MAX_STEP, "a step: a whole number from 1 to 10**15"),
                   action="append", default=[], help="step to predict (repeatable; needs --out)")
    w.add_argument("--out", type=Path, help="folder for step-T/ predictions and watch.json (the latest status)")
    w.add_argument("--every", type=bounded(int, 1, math.inf, "a whole number of checkpoints, at least 1"), default=1,
                   help="rewrite the predictions every N new checkpoints (default 1)")
    w.add_argument("--window", type=bounded(int, 2, math.inf, "a whole number of checkpoints, at least 2 (a line)"),
                   help="use only the latest N checkpoints (default all; each new one re-reads the window's others)")
    w.add_argument("--poll", type=bounded(float, 0.01, A_DAY, f"seconds from 0.01 to {A_DAY:g}"), default=5.0,
                   help="seconds between looks at the run folder (default 5)")
    w.add_argument("--settle", type=bounded(float, 0.0, A_DAY, f"seconds from 0 to {A_DAY:g}"), default=30.0,
                   help="seconds a checkpoint without a completion marker (trainer_state.json) must stay unchanged "
                        "before it is read (default 30)")
    w.add_argument("--once", action="store_true", help="take the checkpoints complete now, write, and exit")
    w.add_argument("--memory-budget", default="2GB", help="bound on the process's own memory (default 2GB)")
    w.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    w.add_argument("--cache", type=Path, help="statistics cache folder (default ~/.cache/relex)")
    w.add_argument("--no-cache", action="store_true", help="neither read nor write the statistics cache")
    w.add_argument("--allow-pickle", action="store_true", help="load .bin pickle checkpoints (weights_only=True)")
    w.add_argument("--overwrite", action="store_true",
                   help="replace outputs in --out that an earlier watch of this run did not write")
    add_verify_arguments(w)
    w.add_argument("-q", "--quiet", action="store_true", help="no live line or warnings")
    w.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    w.set_defaults(func=cmd_watch)


def live_line(watcher: Watcher) -> str:
    """One line: the newest step, the window, the median diagnostics against a random walk, the safe horizon."""
    s = watcher.status or {}
    if not s.get("window"):
        return f"watching {watcher.run}: no complete checkpoint yet"
    window = s["window"]
    parts = [f"step {s['step']}", f"{s['checkpoints_taken']} ckpts (window {window[0]}..{window[-1]}, "
                                  f"{len(s['on_disk'])} on disk)"]
    if "median" in s:
        med, walk = s["median"], s["random_walk"]
        parts.append(f"rank-1 {med['rank1_share']:.3f} (walk {walk['rank1_share']:.2f})")
        parts.append(f"R^2 {med['r2_linear']:.3f} (walk {walk['r2_linear']:.2f})")
        parts.append(f"path eff {med['path_efficiency']:.2f} (walk {walk['path_efficiency']:.2f})")
        parts.append(f"growth t^{s['growth_exponent']:.2f}")
        horizon = s["safe_horizon"]
        parts.append("safe: too few ckpts to backtest" if horizon is None
                     else f"safe {horizon:g}x (step {s['safe_step']})")
    if watcher.written:
        parts.append("wrote " + ", ".join(p.name for p in watcher.written))
    return " | ".join(parts)


def cmd_watch(args: argparse.Namespace) -> int:
    """Follow ``--run`` until Ctrl-C or SIGTERM (or, with ``--once``, one look); both stop cleanly with code 0."""
    from relex.live.watcher import Watcher

    watcher = Watcher(args.base, args.run, args.target, args.out, every=args.every, settle=args.settle,
                      window=args.window, cache=False if args.no_cache else args.cache,
                      memory_budget=args.memory_budget, device=args.device, overwrite=args.overwrite,
                      allow_pickle=args.allow_pickle, verify=verify_options(args))
    tty = sys.stdout.isatty()
    last_verdict = None
    try:
        while True:
            taken = watcher.poll()
            if taken and not args.quiet:
                line = live_line(watcher)
                print(f"\r\033[K{line}" if tty else line, end="" if tty else "\n", flush=True)
                verdict = (watcher.status or {}).get("verdict")
                if verdict != last_verdict:
                    print(("\n" if tty else "") + f"verdict: {verdict}", flush=True)
                    last_verdict = verdict
            if args.once:
                break
            time.sleep(args.poll)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: any prediction being written was discarded, earlier ones stand
        pass
    if not args.quiet:
        written = ", ".join(str(p) for p in watcher.written) or "no predictions"
        print(f"{chr(10) if tty else ''}relex watch: stopped after {len(watcher.steps)} checkpoint(s); {written}",
              file=sys.stderr)
    return 0
