"""Our speed at two revisions of the code, in alternating pairs: ``python -m benchmarks.revisions --before REF``.

Where a change should leave the speed where it was (a reorganisation, a refactor), this measures both: the
working tree as it is and the commit ``REF`` (checked out into a temporary ``git worktree``), each round one fresh
process per side, back to back, with the suite's own jobs (``benchmarks.ours train`` at the suite's batch and
``benchmarks.ours sample``: 100 samples, T = 100 steps), both CPU presets. A round's ratio is after / before; the
figure to quote is the median over rounds, and a ratio's spread across rounds is the noise it is to be judged
against. Run it alone on the machine. First it compares the programs themselves: the digest of each
preset's lowered train step in each tree (``benchmarks/lowered_digest.py``); equal digests mean XLA is handed
the same program, so the speed is the same by construction. Prints a table and writes
``benchmarks/results/revisions-cpu.json`` (``--programs-only``: the digests alone, into
``revisions-programs-cpu.json``; ``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import paired
from benchmarks.__main__ import PRESETS, RESULTS, cpu_info, machine_line, matmul_peak_gflops, run

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"train": "train_images_per_s", "sample": "samples_per_s"}


def jobs(preset: str, task: str, steps: int) -> list[str]:
    """``benchmarks.ours`` arguments of the suite's ``ours`` row for ``preset`` and ``task``."""
    if task == "train":
        return ["train", "--preset", preset, "--batch", str(PRESETS[preset]["batch"]), "--steps", str(steps)]
    return ["sample", "--preset", preset, "--n", "100"]


def measure(tree: Path, preset: str, task: str, steps: int, timeout: float) -> dict:
    """One fresh process of ``benchmarks.ours`` running the code of ``tree``."""
    env = {"PYTHONPATH": str(tree)}  # this tree's ddpm_jax and benchmarks, whatever is installed
    return run("benchmarks.ours", jobs(preset, task, steps), timeout, env=env, cwd=str(tree))


def program_digests(tree: Path, timeout: float) -> dict:
    """``benchmarks/lowered_digest.py`` (this tree's script) run against the package of ``tree``: preset ->
    digest, or ``{"error": ...}``, also where the package imported was not ``tree``'s (an installed one)."""
    try:
        out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lowered_digest.py"), "--expect", str(tree)], cwd=tree,
                             env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])["digests"]


def summarize(rounds: list[dict]) -> dict:
    """:func:`benchmarks.paired.summarize` of the rounds with the ratio after / before."""
    return paired.summarize(rounds, numerator="after", denominator="before")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.revisions", description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="a git revision (commit, tag, branch) to compare the tree with")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed train steps per measurement")
    p.add_argument("--only", nargs="+", choices=tuple(PRESETS), default=tuple(PRESETS))
    p.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=tuple(TASKS))
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--programs-only", action="store_true", help="compare the lowered programs, time nothing")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        p.error(f"--rounds and --steps must be at least 1, got {args.rounds} and {args.steps}.")
    revision = subprocess.run(["git", "rev-parse", "--verify", f"{args.before}^{{commit}}"], cwd=ROOT,
                              capture_output=True, text=True)
    if revision.returncode != 0:
        p.error(f"--before {args.before!r} is not a commit of this repository ({revision.stderr.strip()}).")
    commit = revision.stdout.strip()
    cpu, peak = cpu_info(), matmul_peak_gflops()
    print(machine_line(cpu, peak), flush=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="ddpm-jax-before-") as tmp:
        before = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(before), commit], cwd=ROOT, check=True)
        try:
            programs = {"before": program_digests(before, args.timeout), "after": program_digests(ROOT, args.timeout)}
            programs["same"] = "error" not in programs["before"] and programs["before"] == programs["after"]
            print(f"lowered train steps: before {programs['before']}, after {programs['after']}: "
                  + ("the same programs" if programs["same"] else "different programs"), flush=True)
            for preset in [] if args.programs_only else args.only:
                for task in args.tasks:
                    rounds = []
                    for i in range(args.rounds):
                        row = {}
                        # Alternate which side goes first, so a drift in the machine's speed favours neither.
                        sides = [("before", before), ("after", ROOT)][:: 1 if i % 2 == 0 else -1]
                        for side, tree in sides:
                            r = measure(tree, preset, task, args.steps, args.timeout)
                            row[side] = r.get(TASKS[task])
                            if r.get("error"):
                                row[f"{side} error"] = r["error"]
                        rounds.append(row)
                        print(f"  {preset} {task} round {i + 1}: before {row.get('before') or 0:.1f}, after "
                              f"{row.get('after') or 0:.1f} {'images' if task == 'train' else 'samples'}/s", flush=True)
                    results[f"{preset} {task}"] = summarize(rounds)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
    if results:
        print(f"\n{'row':14} {'before':>9} {'after':>9} {'ratios (after / before)':>26} {'median':>7}")
        for name, s in results.items():
            fmt = lambda v: f"{v:.1f}" if v else "-"  # noqa: E731
            ratios = " ".join(f"{r:.3f}" for r in s["ratios"]) or "-"
            median = f"{s['median_ratio']:.3f}" if s["median_ratio"] else "-"
            print(f"{name:14} {fmt(s['median_before']):>9} {fmt(s['median_after']):>9} {ratios:>26} {median:>7}")
    default = "revisions-programs-cpu.json" if args.programs_only else "revisions-cpu.json"
    out = Path(args.out) if args.out else RESULTS / default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "before": commit, "after": subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                                                   capture_output=True, text=True).stdout.strip(),
        "cpu_model": cpu["model"], "avx512": cpu["avx512"], "cpu_count": os.cpu_count(), "matmul_peak_gflops": peak,
        "programs": programs,
        "steps": args.steps, "units": {"train": "images/s", "sample": "samples/s"}, "rows": results,
    }, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
