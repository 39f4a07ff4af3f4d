"""relex: predict the later checkpoints of an RLVR run from its first ones, and check how far to trust it.

Bad input ends with one line on stderr and exit code 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NoReturn

from relex.errors import RelexError
from relex.units import parse_size

if TYPE_CHECKING:
    from rich.table import Table

    from relex.verify import VerifyOptions

log = logging.getLogger("relex")

THREADS_PER_CORE = 4  # more torch threads than this per core only slow down (and 100000 crash OpenMP)


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as relex reports bad input: one line and exit 2, not the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"relex: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def _size(text: str) -> str:
    """argparse type of a byte size (``2GB``): checked here, kept as written for the messages that quote it."""
    try:
        parse_size(text)
    except RelexError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _add_io(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, type=Path, help="base model folder (theta_0)")
    p.add_argument("--run", type=Path, help="run folder with checkpoint-N/, global_step_N/, step-N/ ...")
    p.add_argument("--checkpoint", action="append", default=[], metavar="STEP=PATH",
                   help="name a checkpoint explicitly (repeatable; replaces --run discovery)")
    p.add_argument("--cutoff", type=int, help="last observed step (default: all checkpoints)")
    p.add_argument("--memory-budget", default="2GB", type=_size, help="bound on the process's own memory (default 2GB)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (default: torch's, one per core); 1 keeps a shared machine responsive")
    p.add_argument("--cache", type=Path, help="statistics cache folder (default ~/.cache/relex)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the statistics cache")
    p.add_argument("--allow-pickle", action="store_true", help="load .bin pickle checkpoints (weights_only=True)")
    p.add_argument("--delta-dtype", choices=["float64", "float16"], default="float64",
                   help="float64 (default): exact W_t - W_0; float16: the RELEX reference code's fp16 subtraction, "
                        "to compare with published numbers (docs/methods.md)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local (default): this process; ray: Ray tasks on every node that sees the files, "
                        "same results (pip install 'relex-rlvr[ray]'; docs/ray.md)")
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="--executor ray: the cluster to join, as ray.init takes it (auto, HOST:PORT; default: "
                        "RAY_ADDRESS, else a cluster `ray start` began here, else a new local instance)")
    _add_verbosity(p)


def _add_probe(p: argparse.ArgumentParser) -> None:
    p.add_argument("--probe", type=Path, metavar="FILE",
                   help="judge in function space: prompts (one per line, or JSONL with a 'prompt' field) on which "
                        "each backtest prediction is compared with the real checkpoint and with stopping")
    p.add_argument("--raw-prompts", action="store_true", help="--probe: do not apply the tokenizer's chat template")
    p.add_argument("--probe-tokens", type=int, default=32,
                   help="--probe: greedy continuation length of the real checkpoint (default 32)")
    p.add_argument("--probe-margin", type=float, default=2.0,
                   help="--probe: standard errors by which a prediction must beat stopping (default 2)")


def _probe_rows(args: argparse.Namespace, observed, stats: dict, rows: list[dict]) -> list[dict] | None:
    """The function-space backtest when --probe is given, else None."""
    if args.probe is None:
        return None
    from relex.analysis.probe import run_probe

    return run_probe(observed, stats, rows, args.probe, raw_prompts=args.raw_prompts,
                     max_new_tokens=args.probe_tokens, margin=args.probe_margin, device=args.device,
                     memory_budget=args.memory_budget, progress=not args.quiet)


def _window_probe(args: argparse.Namespace, observed, stats: dict) -> list[dict] | None:
    """--probe for analyze and report, whose statistics may cover later steps: backtest the window only."""
    if args.probe is None:
        return None
    from relex.analysis.backtest import backtest

    window = {n: s.subset(observed.steps) for n, s in stats.items()}
    return _probe_rows(args, observed, window, backtest(window))


def _add_verbosity(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or warnings")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")


def build_parser() -> argparse.ArgumentParser:
    from relex import __version__
    from relex.methods import METHODS
    from relex.verify import add_verify_arguments

    parser = _Parser(prog="relex", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"relex {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    ex = sub.add_parser("extrapolate", help="write predicted checkpoints as Hugging Face model folders")
    _add_io(ex)
    ex.add_argument("--target", type=int, action="append", default=[], help="step to predict (repeatable)")
    ex.add_argument("--out", type=Path, required=True, help="output folder; one step-T/ per target")
    ex.add_argument("--method", default="relex", choices=sorted(METHODS), help="extrapolation method")
    ex.add_argument("--rank", type=int, default=1, help="subspace rank for relex/reconstruct (default 1)")
    ex.add_argument("--anchor", type=int, default=0,
                    help="take deltas from the checkpoint at this step instead of the base (default 0)")
    ex.add_argument("--reconstruct", action="store_true",
                    help="write the rank-r reconstruction of the observed checkpoints (Algorithm 1)")
    for method in METHODS.values():
        method.add_arguments(ex)
    ex.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="output dtype (default: input's)")
    ex.add_argument("--max-shard-size", default="5GB", type=_size, help="largest output shard (default 5GB)")
    ex.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    ex.add_argument("--auto", action="store_true",
                    help="choose trend, window offset and rank by backtest; refuse targets beyond its safe horizon")
    ex.add_argument("--max-error", type=float, default=0.5,
                    help="--auto: largest backtest relative error counted as safe (default 0.5)")
    ex.add_argument("--clip", action="store_true", help="--auto: clip targets to the safe horizon instead of refusing")
    ex.add_argument("--force", action="store_true", help="--auto: write targets beyond the safe horizon anyway")
    ex.add_argument("--shrink", type=float, action="append", metavar="LAMBDA",
                    help="write W_0 + LAMBDA (W_pred - W_0), the prediction moved towards the base (default 1); "
                         "with --verify, repeatable: the grid to choose from (default 0.25 0.5 0.75 1)")
    _add_probe(ex)
    add_verify_arguments(ex)
    ex.set_defaults(func=cmd_extrapolate, fast_exit=True)

    bt = sub.add_parser("backtest", help="fit on prefixes of the window, score predictions of its last checkpoint")
    _add_io(bt)
    bt.add_argument("--json", type=Path, help="write all rows as JSON")
    bt.add_argument("--plot", type=Path, help="write a PNG of error against horizon")
    bt.add_argument("--max-error", type=float, default=0.5, help="relative error counted as safe (default 0.5)")
    bt.add_argument("--eval-command", help="score predictions too: a command with {model} that prints a number, "
                                           "e.g. 'relex eval {model} --profile default --score-only'")
    _add_probe(bt)
    bt.add_argument("--eval-settings", default="relex linear,best",
                    help="settings to score with --eval-command (comma list; 'best' = best per horizon)")
    bt.set_defaults(func=cmd_backtest, fast_exit=True)

    an = sub.add_parser("analyze", help="rank-1 share and linear-fit quality of every tensor's trajectory")
    _add_io(an)
    an.add_argument("--json", type=Path, help="write the full report as JSON")
    an.add_argument("--worst", type=int, default=10, help="list this many worst tensors (default 10)")
    an.add_argument("--compare", action="store_true",
                    help="also read later checkpoints and report RELEX's alignment with them")
    _add_probe(an)
    an.set_defaults(func=cmd_analyze, fast_exit=True)

    rp = sub.add_parser("report", help="one Markdown page with diagnostics, backtest and plots")
    _add_io(rp)
    rp.add_argument("--out", type=Path, required=True, help="folder for report.md, report.json and PNGs")
    rp.add_argument("--scores", type=Path,
                    help='accuracy by step as JSON: {"real": {"STEP": acc, ...}, "relex": {...}}')
    rp.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    _add_probe(rp)
    rp.set_defaults(func=cmd_report, fast_exit=True)

    from relex.live.cli import register as register_watch

    register_watch(sub)

    from relex.eval.cli import register as register_eval

    register_eval(sub)
    try:
        from relex.lab.cli import register
    except ImportError:  # the lab needs the [lab] extra (transformers, TRL); relex eval then takes --dataset only
        pass
    else:
        register(sub)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.ERROR if getattr(args, "quiet", False) else (
        logging.WARNING, logging.INFO, logging.DEBUG)[min(getattr(args, "verbose", 0), 2)]
    logging.basicConfig(level=level, format="relex: %(levelname)s: %(message)s")


def _trajectory(args: argparse.Namespace):
    """The run's trajectory (its steps checked against MAX_STEP by discovery) and any --target checked too."""
    from relex.trajectory import Trajectory
    from relex.trajectory.discover import MAX_STEP

    trajectory = Trajectory.discover(args.base, args.run, args.checkpoint or None, allow_pickle=args.allow_pickle)
    for target in getattr(args, "target", []):
        if target > MAX_STEP:
            raise RelexError(f"--target {target} is above 10**15, the largest step relex fits exactly")
    return trajectory


def _refuse_replacing_inputs(outputs: list[Path], args: argparse.Namespace, trajectory) -> None:
    """Refuse, before anything is touched, an output folder replaced whole that is, or holds, the run, the base,
    a checkpoint or a file the command reads (``--probe``, ``--scores``)."""
    from relex.tempfiles import refuse_overlap

    for out in outputs:
        refuse_overlap(out, run=args.run, base=args.base, probe=args.probe, scores=getattr(args, "scores", None))
        for checkpoint in trajectory.checkpoints:
            refuse_overlap(out, checkpoint=checkpoint.path)


def _refuse_writing_over_inputs(flag: str, path: Path | None, args: argparse.Namespace, trajectory) -> None:
    """Refuse an output file (``--json``, ``--plot``) inside a model folder the command reads, or that is the run
    folder or the ``--probe`` file: it would overwrite, or join, what is read."""
    if path is None:
        return
    target = path.resolve()
    models = [args.base, *(c.path for c in trajectory.checkpoints)]
    if (any(target.is_relative_to(m.resolve()) for m in models)
            or target in {p.resolve() for p in (args.run, args.probe) if p is not None}):
        raise RelexError(f"{flag} {path}: would write into what this command reads (a model folder, the run folder "
                         "or the --probe file); write it elsewhere")


def _engine_options(args: argparse.Namespace) -> dict:
    if args.delta_dtype != "float64" and (getattr(args, "probe", None) or getattr(args, "verify", None) is not None):
        raise RelexError(f"--delta-dtype {args.delta_dtype} is for comparing with published numbers; --probe and "
                         "--verify load candidates from exact deltas: use the default float64 with them")
    return {"memory_budget": args.memory_budget, "device": args.device,
            "cache": False if args.no_cache else args.cache, "progress": not args.quiet,
            "executor": args.executor, "ray_address": args.ray_address, "delta_dtype": args.delta_dtype}


def cmd_extrapolate(args: argparse.Namespace) -> int:
    from relex.materialize import extrapolate
    from relex.methods import METHODS

    run_info = {"run": str(args.run.resolve()) if args.run else None}
    if args.probe and not args.auto:
        raise RelexError("--probe judges --auto's choice: pass --auto with it")
    trajectory = _trajectory(args)
    planned = args.target or ([s for s in trajectory.steps if args.cutoff is None or s <= args.cutoff]
                              if args.reconstruct else [])
    _refuse_replacing_inputs([args.out / f"step-{t}" for t in planned], args, trajectory)
    shrinks = args.shrink or ([1.0] if args.verify is None else None)
    if args.verify is None and len(shrinks) > 1:
        raise RelexError("several --shrink values need --verify to choose among them")
    if args.verify is not None and args.reconstruct:
        raise RelexError("--verify chooses among predictions; --reconstruct writes the observed checkpoints")
    args.shrink = shrinks[0] if args.verify is None else 1.0
    from relex.verify import verify_options

    verifying = verify_options(args, None if args.verify is None else shrinks)  # its refusals before any work
    if args.auto:
        from relex.analysis.auto import auto_method
        from relex.analysis.backtest import backtest
        from relex.materialize import compute_stats

        if not args.target:
            raise RelexError("--auto needs at least one --target")
        observed = trajectory.observed(args.cutoff)
        stats = compute_stats(observed, **_engine_options(args))
        rows = backtest(stats)
        method, targets, run_info["auto"] = auto_method(stats, args.target, args.cutoff, max_error=args.max_error,
                                                         force=args.force, clip=args.clip, rows=rows,
                                                         probe_rows=_probe_rows(args, observed, stats, rows))
        log.info("--auto chose %s: %s", run_info["auto"]["chosen"], run_info["auto"]["reason"])
        method.shrink = args.shrink
        method.fit(observed, progress=not args.quiet)
        options = {"stats": stats}  # the backtest's statistics: no second Gram pass
    else:
        name = "reconstruct" if args.reconstruct else args.method
        METHODS[name].warn_ignored(args)
        method = METHODS[name].from_args(args).fit(trajectory, progress=not args.quiet,
                                                   memory_budget=args.memory_budget)
        targets = args.target or (method.trajectory_.steps if name == "reconstruct" else [])
        options = {}
    if verifying is not None:
        return _verified(args, method, targets, verifying, run_info, options.get("stats"))
    folders = extrapolate(method, args.out, targets, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
                          dtype=args.dtype, **_engine_options(args), run_info=run_info, **options)
    if not args.quiet:
        for folder in folders:
            print(folder)
        if folders and not args.reconstruct:
            _hint_check(method.trajectory_.checkpoints[-1].path, folders[0])
    return 0


def _verified(args: argparse.Namespace, method, targets: list[int], options: VerifyOptions, run_info: dict,
              stats: dict | None) -> int:
    """--verify: race the candidates, print their table, write the pick only if confirmed (else exit 3)."""
    from relex.verify import NOT_VERIFIED, verdict_table, verified_extrapolate

    engine = {k: v for k, v in _engine_options(args).items() if k != "progress"}
    verdict, folders = verified_extrapolate(method, targets, args.out, options, engine=engine, stats=stats,
                                            progress=not args.quiet, overwrite=args.overwrite, dtype=args.dtype,
                                            max_shard_size=args.max_shard_size, run_info=run_info)
    if not args.quiet:
        _console().print(verdict_table(verdict))
        for folder in folders:
            print(folder)
    if not verdict.published:
        print(f"relex: not verified: {verdict.summary()}; nothing written", file=sys.stderr)
        return NOT_VERIFIED
    return 0


def _hint_check(cutoff_dir: Path, prediction: Path) -> None:
    """Point at the one check that told extrapolations that helped from ones that hurt (docs/trust.md)."""
    print(f"relex: before using a prediction, compare it with the cutoff checkpoint on held-out problems your "
          f"verifier grades, e.g. `relex eval {cutoff_dir} {prediction} --dataset FILE.jsonl` (a paired "
          "difference): on the LLM lab, windows that looked alike gained 10 points or lost 20 (docs/trust.md)",
          file=sys.stderr)


def cmd_analyze(args: argparse.Namespace) -> int:
    from relex.analysis.overview import analyze_run
    from relex.materialize import compute_stats

    traj = _trajectory(args)
    _refuse_writing_over_inputs("--json", args.json, args, traj)
    observed = traj.observed(args.cutoff)
    later = [s for s in traj.steps if s > observed.steps[-1]] if args.compare else []
    stats = compute_stats(traj.observed(None) if later else observed, **_engine_options(args))
    report = analyze_run(stats, observed.steps, probe_rows=_window_probe(args, observed, stats))
    _print_analysis(report, args.worst)
    if args.json:
        from relex.jsonout import write_json

        write_json(args.json, report)
    return 0


def cmd_backtest(args: argparse.Namespace) -> int:
    from relex.analysis.backtest import backtest, safe_horizon
    from relex.materialize import compute_stats

    trajectory = _trajectory(args)
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        _refuse_writing_over_inputs(flag, path, args, trajectory)
    observed = trajectory.observed(args.cutoff)
    options = _engine_options(args)
    stats = compute_stats(observed, **options)
    rows = backtest(stats)
    if not rows:
        raise RelexError(f"{len(observed.steps)} observed checkpoints are too few to backtest (need 3 at or before "
                         "cutoff/1.5)")
    safe = {label: safe_horizon(rows, label, args.max_error) for label in dict.fromkeys(r["setting"] for r in rows)}
    probe_rows = _probe_rows(args, observed, stats, rows)
    real = None
    if args.eval_command:
        from relex.analysis.backtest import choose
        from relex.analysis.backtest_eval import score_backtest

        wanted = [w.strip() for w in args.eval_settings.split(",")]
        labels = {w for w in wanted if w != "best"}
        if "best" in wanted:
            labels |= {choose([r for r in rows if r["horizon"] == h], h) for h in {r["horizon"] for r in rows}}
        real = score_backtest(observed, rows, sorted(labels), args.eval_command, options["cache"], options["progress"])
    _print_backtest(rows, safe, real)
    if probe_rows:
        from relex.analysis.probe import safe_horizon_by_probe

        probe_safe = {label: safe_horizon_by_probe(probe_rows, label) for label in safe}
        _print_probe(probe_rows, probe_safe)
    else:
        probe_safe = None
        print("Safe horizons above are in weight space only (relative weight error), which does not track accuracy; "
              "pass --probe FILE to compare the predicted models' outputs with stopping.")
    if args.json:
        from relex.jsonout import write_json

        write_json(args.json, {"observed_steps": observed.steps, "rows": rows, "safe_horizon": safe, "real": real,
                               "space": "function" if probe_rows else "weight", "probe": probe_rows,
                               "probe_safe_horizon": probe_safe})
    if args.plot:
        from relex.analysis.plots import plot_backtest

        plot_backtest(rows, args.plot)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from relex.analysis.report import check_out, check_scores, write_report
    from relex.materialize import compute_stats
    from relex.safeio import read_json_object

    traj = _trajectory(args)
    _refuse_replacing_inputs([args.out], args, traj)
    check_out(args.out, args.overwrite)
    scores = check_scores(read_json_object(args.scores), args.scores) if args.scores else None
    observed = traj.observed(args.cutoff)
    stats = compute_stats(traj.observed(None), **_engine_options(args))
    path = write_report(stats, observed.steps, args.out, scores, _window_probe(args, observed, stats),
                        overwrite=args.overwrite)
    if not args.quiet:
        print(path)
    return 0


def _console():
    """A rich console that keeps long tensor names readable when output goes to a file or pipe."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def _horizon_table(title: str, rows: list[dict], safe: dict[str, float], cell: Callable[[dict], str]) -> Table:
    """One row per setting, one column per backtest horizon (``cell(row)`` renders a result), then its safe horizon."""
    from rich.table import Table

    horizons = sorted({r["horizon"] for r in rows})
    table = Table(title=title)
    table.add_column("setting")
    for h in horizons:
        table.add_column(f"h={h:g}", justify="right")
    table.add_column("safe", justify="right")
    for label, horizon in safe.items():
        found = [next((r for r in rows if r["setting"] == label and r["horizon"] == h), None) for h in horizons]
        table.add_row(label, *(cell(r) if r else "-" for r in found), f"{horizon:g}x")
    return table


def _print_backtest(rows: list[dict], safe: dict[str, float], real: dict | None = None) -> None:
    def cell(row: dict) -> str:
        text = f"{row['relative_error']:.3f} ({row['error_vs_stay']:.2f})"
        return text + (f" acc {row['accuracy']:.3f}" if "accuracy" in row else "")

    console = _console()
    console.print(_horizon_table("Backtest: relative error ||pred - real|| / ||real - W_0|| of the last observed "
                                 "checkpoint, predicted from the prefix at cutoff/h (in brackets: error / error of "
                                 "stopping)", rows, safe, cell))
    if real:
        console.print(f"Real checkpoint at step {real['step']}: accuracy {real['accuracy']:.4f}")


def _print_probe(rows: list[dict], safe: dict[str, float]) -> None:
    _console().print(_horizon_table(
        "Function-space backtest: mean token KL(real || predicted) on the probe, in brackets / stopping's; "
        "* = below stopping by more than the margin (safe)", rows, safe,
        lambda row: f"{row['kl']:.4f} ({row['kl_vs_stay']:.2f}){'*' if row['safe'] else ''}"))


def _print_analysis(report: dict, worst: int) -> None:
    from rich.table import Table

    console = _console()
    summary = report["summary"]
    steps = report["observed_steps"]
    table = Table(title=f"Trajectory summary: {summary['tensors_moving']}/{summary['tensors']} tensors moved, "
                        f"{len(steps)} checkpoints, steps {steps[0]}..{steps[-1]}")
    table.add_column("metric")
    for col in ("median", "p10", "share over threshold"):
        table.add_column(col, justify="right")
    labels = {"explained_var_rank1": "explained variance, rank 1", "r2_linear": "R^2 of linear fit c1(t)"}
    for key, label in labels.items():
        row = summary[key]
        share_key = next(k for k in row if k.startswith("share_over_"))
        table.add_row(f"{label} (> {share_key.removeprefix('share_over_')})", f"{row['median']:.4f}",
                      f"{row['p10']:.4f}", f"{100 * row[share_key]:.1f}%")
    console.print(table)
    tensors = [t for t in report["tensors"] if t["delta_norm"] > 0]
    tensors.sort(key=lambda t: (t["r2_linear"] if not math.isnan(t["r2_linear"]) else -1.0))
    if worst and tensors:
        detail = Table(title=f"Worst {min(worst, len(tensors))} tensors by R^2")
        for col in ("tensor", "numel", "expl. var r1", "R^2", "slope", "intercept", "||delta||"):
            detail.add_column(col, justify="left" if col == "tensor" else "right")
        for t in tensors[:worst]:
            detail.add_row(t["name"], f"{t['numel']:,}", f"{t['explained_var_rank1']:.4f}", f"{t['r2_linear']:.4f}",
                           f"{t['slope']:.3g}", f"{t['intercept']:.3g}", f"{t['delta_norm']:.4g}")
        console.print(detail)
    diag = report["diagnostics"]
    checks = Table(title="Diagnostics against a random walk of the same steps (median over tensors)")
    for col in ("diagnostic", "this run", "random walk (mean +- std)"):
        checks.add_column(col, justify="left" if col == "diagnostic" else "right")
    for key, value in diag["median"].items():
        null = diag["random_walk"][key]
        checks.add_row(key.replace("_", " "), f"{value:.4f}", f"{null['mean']:.4f} +- {null['std']:.4f}")
    checks.add_row("growth exponent, whole model", f"{diag['whole_model']['growth_exponent']:.4f}", "0.5")
    console.print(checks)
    console.print(f"[bold]Verdict:[/bold] {report['verdict']}")
    if report["alignment"]:
        align = Table(title="RELEX (rank 1) against the real later checkpoints")
        for col in ("step", "mean cosine", "mean norm ratio", "relative error"):
            align.add_column(col, justify="right")
        for row in report["alignment"]:
            align.add_row(str(row["step"]), f"{row['mean_cosine']:.4f}", f"{row['mean_norm_ratio']:.3f}",
                          f"{row['relative_error']:.4f}")
        console.print(align)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or ``timeout``'s stop), raised where the process is, like Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _set_threads(threads: int | None) -> None:
    """Apply --threads (every command that has it) before any work starts."""
    if threads is None:
        return
    if threads < 1:
        raise RelexError(f"--threads {threads} must be >= 1")
    most = THREADS_PER_CORE * (os.cpu_count() or 1)
    if threads > most:
        raise RelexError(f"--threads {threads} is more than {THREADS_PER_CORE} per core: at most {most} here")
    import torch

    torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` (default: the process's arguments); returns its exit status."""
    return _execute(build_parser().parse_args(argv))


def _execute(args: argparse.Namespace) -> int:
    _setup_logging(args)
    if isinstance(getattr(args, "memory_budget", None), str):  # made once: its one warning, then handed down
        from relex.budget import MemoryBudget

        args.memory_budget = MemoryBudget.from_flag(args.memory_budget)
    handles_signals = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if handles_signals else None
    try:
        _set_threads(getattr(args, "threads", None))
        return args.func(args)
    except RelexError as exc:
        print(f"relex: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # one the layers below did not name: still one line, and nothing was published
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"relex: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("relex: interrupted; no output was published", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(exc, Terminated) else 130
    finally:
        if handles_signals:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def run() -> NoReturn:
    """The ``relex`` command: ``main``, then, for the commands that only read checkpoints and write files
    (``fast_exit``), an exit without the interpreter's teardown: torch's and numba's finalizers took 0.5-1.5 s
    from a script's last line to its process's end (0.03-0.08 s without them; 2 busy cores). Output streams are
    flushed first; a command that loaded Ray (whose shutdown runs at exit), or runs under a profiler or coverage
    (which write their files at exit), ends normally."""
    args = build_parser().parse_args()
    code = _execute(args)
    watched = sys.getprofile() is not None or sys.gettrace() is not None  # a profiler or coverage writes at exit
    if not getattr(args, "fast_exit", False) or "ray" in sys.modules or watched:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (relex ... | head): nothing more to say
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
