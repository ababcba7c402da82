"""A change's cost, measured against the code before it in the same run: a benchmark run
on BASE and on the working tree alternately, head/base per figure with its spread.

    .venv/bin/python benchmarks/compare.py BASE [--bench serve_load] [--rounds 3]
    make bench-compare BASE=origin/main [BENCH=serve_load]

BASE (any commit: origin/main, a sha, HEAD~3) is checked out in a worktree under
.bench/ with a virtual environment of its own, which installs BASE's rayline (editable)
on top of this tree's .venv (a .pth line: torch and Ray are not installed twice; what
BASE needs that .venv lacks is installed into BASE's own). Both sides run the working
tree's benchmark script, so the figures differ by the library alone; `--script-from
base` runs BASE's own script on BASE instead (when the script changed with the code).

The rounds go B H, H B, B H, ... (each pair in the other order than the last, so a
machine that speeds up or slows down during the run does not favour one side). For each
figure: the median of the per-round ratios head/base, and their spread (half the range
of the ratios); a figure worse than base by more than the spread plus 10 % is flagged.
On 2 cores the VM's own speed moves a few per cent from minute to minute
(docs/benchmarks.md), which the spread shows.

Why not asv: `asv continuous` does the same for a package whose benchmarks are small
functions timed in-process. Ours are whole systems (a local Ray, Serve, an HAProxy, a
load generator in another process) whose figures come from one JSON line; asv would
have to wrap each script as one "track" benchmark and build a full environment per
commit (torch and Ray each time), for the same alternation this script does in a page.

Last stdout line: {"base": sha, "head": "working tree at sha", "bench", "rounds",
 "figures": {name: {"ratio", "spread", "better": "higher"|"lower", "base": [...],
 "head": [...], "flagged"}}, "flagged": [names]}; exit 1 when anything is flagged.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

from common import emit, log

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".bench"
MARGIN = 0.10
"""How much worse than base a figure may be, beyond its spread, before it is flagged."""


def serve_load_figures(result: dict) -> dict[str, tuple[float, str]]:
    """Requests a second (higher is better) and p99 (lower) of every point served with
    batching (the way `rayline serve` runs), the plain peer's too: it shows the machine's
    own drift between rounds."""
    figures = {}
    for point in result["points"]:
        if point["batching"] is False:
            continue
        name = f"{point['server']} {point['route']}@{point['concurrency']}"
        figures[f"{name} rps"] = (point["rps"], "higher")
        figures[f"{name} p99_ms"] = (point["p99_ms"], "lower")
    # Monitoring on against off in the same round (--parts monitoring): its own ratio.
    for key, ratio in (result.get("monitoring_overhead") or {}).items():
        if key != "points":
            figures[f"monitoring on/off {key}"] = (ratio, "higher")
    # The Open Inference Protocol's DQN path beside the native route's (--parts protocol),
    # each point measured in two passes: their mean.
    passes: dict[str, list[dict]] = {}
    for point in (result.get("protocol") or {}).get("points", []):
        name = f"protocol {point['form']} rows{point['rows']}@{point['concurrency']}"
        passes.setdefault(name, []).append(point)
    for name, measured in passes.items():
        for figure, better in (("rps", "higher"), ("p99_ms", "lower")):
            mean = sum(p[figure] for p in measured) / len(measured)
            figures[f"{name} {figure}"] = (round(mean, 2), better)
    return figures


def dqn_cartpole_figures(result: dict) -> dict[str, tuple[float, str]]:
    rayline = result["systems"]["rayline"]
    return {
        "wall_s": (rayline["median_wall_s"], "lower"),
        "cpu_s": (rayline["median_cpu_s"], "lower"),
        "startup_s": (rayline["median_startup_s"], "lower"),
        "env_steps": (rayline["median_env_steps"], "lower"),
    }


def serve_startup_figures(result: dict) -> dict[str, tuple[float, str]]:
    figures = {"first_answer_s": (result["rayline"]["median_first_answer_s"], "lower")}
    for phase, seconds in result["rayline"].get("startup_phases", {}).items():
        figures[f"phase {phase}_s"] = (seconds, "lower")
    return figures


BENCHES: dict[str, tuple[list[str], Callable[[dict], dict[str, tuple[float, str]]]]] = {
    # name: (the script's arguments for one round, its figures)
    "serve_load": (
        ["serve_load.py", "--parts", "load,protocol", "--seconds", "3"],
        serve_load_figures,
    ),
    "dqn_cartpole": (
        ["dqn_cartpole.py", "--systems", "rayline", "--seeds", "1"],
        dqn_cartpole_figures,
    ),
    "serve_startup": (["serve_startup.py", "--repeats", "1"], serve_startup_figures),
}
"""The benchmarks compare.py knows, each with the arguments of one short round and which
of its figures count, and which way is better. A hot path's benchmark goes here."""


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def build_base(base: str, work: Path = WORK) -> tuple[Path, Path]:
    """(BASE's worktree, its venv's python) under `work`, made once per commit and
    reused."""
    sha = git("rev-parse", "--verify", f"{base}^{{commit}}")
    tree, venv = work / f"tree-{sha[:12]}", work / f"venv-{sha[:12]}"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if not tree.exists():
        log(f"worktree of {base} ({sha[:12]}) in {tree} ...")
        work.mkdir(parents=True, exist_ok=True)
        git("worktree", "add", "--detach", "--force", str(tree), sha)
    if not stamp.exists():
        log(f"its venv in {venv} (on top of {sys.prefix}) ...")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        purelib = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        # This tree's packages after BASE's own: torch and Ray are not installed twice.
        # A plain path line: the .pth files there (this tree's editable rayline) are not
        # read.
        Path(purelib, "zz-head-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "-e", str(tree)], check=True
        )
        stamp.touch()
    where = subprocess.run(
        [str(python), "-c", "import rayline; print(rayline.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        env=clean_env(),
    ).stdout.strip()
    if not where.startswith(str(tree)):
        raise RuntimeError(f"BASE's venv imports rayline from {where}, not from {tree}")
    return tree, python


def clean_env() -> dict[str, str]:
    """The environment a round runs in: nothing that would put another tree's code on
    the path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def run_round(python: Path, script_dir: Path, argv: list[str], extra: list[str]) -> dict:
    started = time.monotonic()
    done = subprocess.run(
        [str(python), str(script_dir / argv[0]), *argv[1:], *extra],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed (exit {done.returncode}): {done.stderr[-3000:]}")
    log(f"  {time.monotonic() - started:.0f} s")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(base: list[dict], head: list[dict], margin: float = MARGIN) -> dict[str, dict]:
    """Per figure, from the rounds' figures (name -> (value, better)) in pairs: the median
    of head/base per pair, the spread (half the range of those ratios), and whether head
    is worse by more than spread + margin."""
    summary = {}
    for name, (_, better) in base[0].items():
        pairs = [(b[name][0], h[name][0]) for b, h in zip(base, head) if name in b and name in h]
        ratios = [h / b for b, h in pairs if b]
        if not ratios:
            continue
        ratio = statistics.median(ratios)
        spread = (max(ratios) - min(ratios)) / 2
        worse = 1 - ratio if better == "higher" else ratio - 1
        summary[name] = {
            "ratio": round(ratio, 3),
            "spread": round(spread, 3),
            "better": better,
            "base": [b for b, _ in pairs],
            "head": [h for _, h in pairs],
            "flagged": worse > spread + margin,
        }
    return summary


def table(summary: dict[str, dict]) -> str:
    lines = [f"{'figure':<44} {'head/base':>9} {'spread':>7}  better  base -> head (medians)"]
    for name, row in summary.items():
        mark = "  <-- worse" if row["flagged"] else ""
        lines.append(
            f"{name:<44} {row['ratio']:>9.3f} {row['spread']:>7.3f}  {row['better']:<6}  "
            f"{statistics.median(row['base']):g} -> {statistics.median(row['head']):g}{mark}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the commit to compare against (origin/main, a sha)")
    parser.add_argument("--bench", default="serve_load", choices=sorted(BENCHES))
    parser.add_argument("--rounds", type=int, default=3, help="rounds per side (at least 3)")
    parser.add_argument(
        "--script-from",
        choices=["head", "base"],
        default="head",
        help="whose benchmark script BASE's rounds run",
    )
    parser.add_argument(
        "--args", default="", help="extra arguments for the benchmark script, one string"
    )
    parser.add_argument(
        "--base-args",
        help="with --script-from base: BASE's script's arguments instead of the bench's "
        "(an older script that lacks a flag), one string",
    )
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds: at least 3 (a spread needs them)")
    try:
        git("rev-parse", "--verify", f"{args.base}^{{commit}}")
    except subprocess.CalledProcessError:
        print(f"compare.py: BASE {args.base!r} is not a commit here", file=sys.stderr)
        sys.exit(2)

    tree, base_python = build_base(args.base)
    argv, figures_of = BENCHES[args.bench]
    extra = args.args.split()
    here = Path(__file__).resolve().parent
    base_scripts = tree / "benchmarks" if args.script_from == "base" else here
    base_argv = argv
    if args.base_args is not None:
        if args.script_from != "base":
            parser.error("--base-args: only with --script-from base")
        base_argv = [argv[0], *args.base_args.split()]
    sides = {
        "base": (base_python, base_scripts, base_argv),
        "head": (Path(sys.executable), here, argv),
    }
    rounds: dict[str, list[dict]] = {"base": [], "head": []}
    for i in range(args.rounds):
        order = ("base", "head") if i % 2 == 0 else ("head", "base")
        for side in order:
            log(f"round {i + 1}/{args.rounds}: {side} ({args.bench}) ...")
            python, scripts, side_argv = sides[side]
            rounds[side].append(figures_of(run_round(python, scripts, side_argv, extra)))
    summary = summarize(rounds["base"], rounds["head"])
    log(table(summary))
    flagged = [name for name, row in summary.items() if row["flagged"]]
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    emit(
        {
            "base": git("rev-parse", args.base),
            "head": f"working tree at {git('rev-parse', 'HEAD')}{dirty}",
            "bench": args.bench,
            "rounds": args.rounds,
            "figures": summary,
            "flagged": flagged,
        }
    )
    sys.exit(1 if flagged else 0)


if __name__ == "__main__":
    main()
