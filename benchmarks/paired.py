"""Train (or sampling) speed, ours against the torch port, in alternating pairs: ``python -m benchmarks.paired``.

On a shared machine whose speed drifts by 10-20% within minutes, one
measurement of each side (``python -m benchmarks``) can put the drift into the
ratio. Here each round measures ours and then the torch port on the same
preset, back to back, each in a fresh process as the suite does
(``benchmarks.ours train`` and ``benchmarks.peers torch-train``, the suite's
arguments); a round's ratio is ours / port, and the figure to quote is the
median of the rounds' ratios. ``--task sample``: the suite's 100-step
sampling rows instead (100 samples, T = 100). Prints a table per preset and writes
``benchmarks/results/paired-cpu.json`` (``paired-sample-cpu.json``; ``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

from benchmarks.__main__ import PRESETS, RESULTS, cpu_info, machine_line, matmul_peak_gflops, plan, run

TASKS = {"train": "train_images_per_s", "sample": "samples_per_s"}


def pair_jobs(preset: str, steps: int, task: str = "train") -> list[tuple[str, str, list[str]]]:
    """(label, module, args) of one round: ours, then the torch port, the suite's own jobs for ``preset``."""
    jobs = {label: (label, module, job_args)
            for job_preset, job_task, label, module, job_args, _ in plan(quick=False, avx512=False, steps=steps)
            if job_preset == preset and job_task == task}
    return [jobs["ours"], jobs["torch port"]]


def summarize(rounds: list[dict], numerator: str = "ours", denominator: str = "torch port") -> dict:
    """Per-round values of both sides and their ratio (``numerator / denominator``, the rounds' keys); medians
    over the rounds where both sides ran, as ``median_ratio`` and ``median_<side>`` (spaces as underscores)."""
    complete = [r for r in rounds if r.get(numerator) and r.get(denominator)]
    ratios = [r[numerator] / r[denominator] for r in complete]
    median = lambda values: statistics.median(values) if values else None  # noqa: E731
    return {
        "rounds": rounds,
        "ratios": ratios,
        "median_ratio": median(ratios),
        **{f"median_{side.replace(' ', '_')}": median([r[side] for r in complete]) for side in (numerator, denominator)},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.paired", description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=tuple(TASKS), default="train")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed train steps per measurement")
    p.add_argument("--only", nargs="+", choices=tuple(PRESETS), default=tuple(PRESETS))
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        p.error(f"--rounds and --steps must be at least 1, got {args.rounds} and {args.steps}.")
    cpu, peak = cpu_info(), matmul_peak_gflops()
    print(machine_line(cpu, peak), flush=True)
    results = {}
    for preset in args.only:
        rounds = []
        for i in range(args.rounds):
            row = {}
            for label, module, job_args in pair_jobs(preset, args.steps, args.task):
                r = run(module, job_args, args.timeout)
                row[label] = r.get(TASKS[args.task])
                if r.get("error"):
                    row[f"{label} error"] = r["error"]
            rounds.append(row)
            ratio = summarize([row])["median_ratio"]
            print(f"  {preset} round {i + 1}: ours {row.get('ours') or 0:.1f}, torch port "
                  f"{row.get('torch port') or 0:.1f} {'images' if args.task == 'train' else 'samples'}/s"
                  + (f", ratio {ratio:.2f}" if ratio else ""), flush=True)
        results[preset] = summarize(rounds)
    unit = "img/s" if args.task == "train" else "samp/s"
    print(f"\n{args.task}: {'preset':8} {'batch':>5} {'ours ' + unit:>11} {'port ' + unit:>11} "
          f"{'ratios (ours / port)':>28} {'median':>6}")
    for preset, s in results.items():
        ratios = " ".join(f"{r:.2f}" for r in s["ratios"]) or "-"
        median = f"{s['median_ratio']:.2f}" if s["median_ratio"] else "-"
        ours = f"{s['median_ours']:.1f}" if s["median_ours"] else "-"
        port = f"{s['median_torch_port']:.1f}" if s["median_torch_port"] else "-"
        batch = PRESETS[preset]["batch"] if args.task == "train" else 100
        print(f"{args.task}: {preset:8} {batch:>5} {ours:>11} {port:>11} {ratios:>28} {median:>6}")
    default_out = "paired-cpu.json" if args.task == "train" else "paired-sample-cpu.json"
    out = Path(args.out) if args.out else RESULTS / default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu["model"], "avx512": cpu["avx512"], "cpu_count": os.cpu_count(),
        "matmul_peak_gflops": peak, "task": args.task, "steps": args.steps, "presets": results,
    }, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
