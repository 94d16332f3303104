"""The benchmark scripts run and report what they claim (tiny workloads; the real suite is `python -m benchmarks`)."""

import json

from benchmarks import __main__ as suite
from benchmarks import ours


def _last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_ours_train_reports_throughput_and_flops(capsys):
    assert ours.main(["train", "--preset", "tiny", "--steps", "2"]) == 0
    r = _last_json(capsys)
    assert r["batch"] == 8 and len(r["step_seconds"]) == 2 and r["train_images_per_s"] > 0
    assert r["flops_per_image"] > 0 and r["loss_finite"]


def test_ours_sample_times_the_whole_chain_or_extrapolates(capsys):
    assert ours.main(["sample", "--preset", "tiny", "--n", "4"]) == 0
    whole = _last_json(capsys)
    assert whole["T"] == 10 and not whole["extrapolated"] and whole["samples_per_s"] > 0
    assert ours.main(["sample", "--preset", "tiny", "--n", "4", "--steps-to-time", "2"]) == 0
    assert _last_json(capsys)["extrapolated"]
    assert ours.main(["sample", "--preset", "tiny", "--n", "4", "--sample-steps", "3", "--method", "ddim"]) == 0
    few = _last_json(capsys)
    assert few["reverse_steps"] == 3 and few["method"] == "ddim" and few["samples_per_s"] > 0


def test_suite_plan_measures_every_peer_on_both_presets():
    jobs = suite.plan(quick=True)
    labels = {(preset, task, label) for preset, task, label, *_ in jobs}
    for preset in ("seed", "cpu"):
        for task in ("train", "sample"):
            for label in ("ours", "ours, YNN fusions", "ours, before", "torch port"):
                assert (preset, task, label) in labels
    assert ("seed", "sample", "diffusers") in labels
    for preset in ("seed", "cpu"):
        assert (preset, "sample10", "ours") in labels and (preset, "sample10", "torch port") in labels


def test_suite_table_prints_ratios_and_survives_failed_peers(capsys):
    rows = [
        {"preset": "cpu", "task": "train", "label": "ours", "train_images_per_s": 200.0, "flops_per_image": 1e8,
         "first_step_seconds": 3.0, "peak_rss_mb": 900},
        {"preset": "cpu", "task": "train", "label": "torch port", "train_images_per_s": 100.0, "peak_rss_mb": 600},
        {"preset": "cpu", "task": "sample", "label": "ours", "samples_per_s": 50.0},
        {"preset": "cpu", "task": "sample", "label": "torch port", "error": "No module named 'torch'"},
        {"preset": "cpu", "task": "sample10", "label": "ours", "samples_per_s": 300.0},
        {"preset": "cpu", "task": "sample10", "label": "torch port", "samples_per_s": 100.0},
    ]
    suite.print_tables(rows, peak=100.0)
    out = capsys.readouterr().out
    torch_line = next(line for line in out.splitlines() if line.startswith("torch port"))
    assert "2.00" in torch_line and "No module" in torch_line
    few_line = [line for line in out.splitlines() if line.startswith("torch port")][1]
    assert "100.00" in few_line and "3.00" in few_line
