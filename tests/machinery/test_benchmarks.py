"""The benchmark scripts run and report what they claim (tiny workloads; the real suite is `python -m benchmarks`)."""

import importlib.metadata
import json
import sys

import pytest

from benchmarks import __main__ as suite
from benchmarks import install_footprint, ours, paired, revisions


def _last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_ours_train_reports_throughput_and_flops(capsys):
    assert ours.main(["train", "--preset", "tiny", "--steps", "2"]) == 0
    r = _last_json(capsys)
    assert r["batch"] == 8 and len(r["step_seconds"]) == 2 and r["train_images_per_s"] > 0
    assert r["flops_per_image"] > 0 and r["loss_finite"]
    assert r["minor_faults_per_step"] >= 0 and r["kernel_cpu_seconds_per_step"] >= 0


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
    jobs = suite.plan(quick=True, avx512=True)
    labels = {(preset, task, label) for preset, task, label, *_ in jobs}
    for preset in ("seed", "cpu"):
        for task in ("train", "sample"):
            for label in ("ours", "ours, no native kernels", "ours, 256-bit vectors", "ours, no XLA flags",
                          "ours, before", "torch port"):
                assert (preset, task, label) in labels
    envs = {label: env for _, _, label, _, _, env in jobs}
    assert envs["ours, 256-bit vectors"] == {"XLA_FLAGS": "--xla_cpu_prefer_vector_width=256"}
    assert envs["ours, no XLA flags"] == {"DDPM_JAX_KEEP_XLA_FLAGS": "1"}
    assert envs["ours, no native kernels"] == {"DDPM_JAX_NATIVE_KERNELS": "0"}
    assert envs["ours, glibc's malloc"] == {"DDPM_JAX_KEEP_MALLOC": "1"}
    assert envs["ours, before"] == {"DDPM_JAX_KEEP_XLA_FLAGS": "1", "DDPM_JAX_KEEP_MALLOC": "1",
                                    "DDPM_JAX_KEEP_RNG_LOWERING": "1"}
    assert envs["torch port, our malloc"] == {"GLIBC_TUNABLES": suite.MALLOC_TUNABLES}
    for preset in ("seed", "cpu"):
        assert {(preset, "train", "ours, glibc's malloc"), (preset, "train", "torch port, our malloc")} <= labels
    assert not any(label == "ours, 256-bit vectors" for _, _, label, *_ in suite.plan(quick=True, avx512=False))
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


def test_ours_guidance_times_both_scales(capsys):
    assert ours.main(["guidance", "--preset", "tiny", "--n", "4", "--guidance-scale", "1"]) == 0
    r = _last_json(capsys)
    assert r["num_classes"] == 10 and r["guidance_scale"] == 1.0 and r["n"] == 4 and r["T"] == 10
    assert r["samples_per_s"] > 0 and r["guided_samples_per_s"] > 0 and r["guided_time_ratio"] > 0


def test_cpu_plan_has_the_guidance_row():
    jobs = suite.plan(quick=False)
    guidance = [job for job in jobs if job[1] == "guidance"]
    assert [(preset, label) for preset, _, label, *_ in guidance] == [("cpu", "ours")]
    assert guidance[0][4][:3] == ["guidance", "--preset", "cpu"]


def test_gpu_plan_runs_the_peers_on_cuda_at_a_gpu_batch():
    jobs = suite.gpu_plan(quick=False, compile_cache="/tmp/cache")
    labels = {(preset, task, label) for preset, task, label, *_ in jobs}
    for task, label in [("train", "ours"), ("train", "torch port"), ("train", "ours, bf16"),
                        ("train", "torch port, bf16"), ("sample", "ours"), ("sample", "torch port"),
                        ("sample10", "ours"), ("sample10", "torch port"), ("guidance", "ours")]:
        assert ("seed", task, label) in labels
    for task in ("train", "sample"):
        assert ("cpu", task, "ours") in labels and ("cpu", task, "torch port") in labels
    assert not any("XLA flags" in label or "256" in label or "before" in label for *_, label in labels)
    assert jobs[0][:3] == ("seed", "train", "ours")  # most wanted first: the budget cuts the tail
    for preset, task, label, module, args, env in jobs:
        assert env["DDPM_JAX_KEEP_XLA_FLAGS"] == "1"
        if module == "benchmarks.peers":
            assert args[args.index("--device") + 1] == "cuda" and "--json" in args
            assert "JAX_COMPILATION_CACHE_DIR" not in env
        else:
            assert env["JAX_COMPILATION_CACHE_DIR"] == "/tmp/cache"
        if task == "train":
            assert args[args.index("--batch") + 1] == str(suite.GPU_BATCH)
            assert args[args.index("--steps") + 1] == str(suite.GPU_STEPS)
            assert ("bf16" in label) == ("bfloat16" in args or "bf16" in args)
        else:
            assert args[args.index("--n") + 1] == str(suite.GPU_BATCH)
    assert "JAX_COMPILATION_CACHE_DIR" not in suite.gpu_plan(quick=True, compile_cache="")[0][5]


def test_gpu_plan_measures_every_torch_variant_on_both_u_net_presets_in_both_precisions():
    jobs = suite.gpu_plan(quick=False)
    by_row = {(preset, task, label): args for preset, task, label, _, args, _ in jobs}
    for preset in ("seed", "gpu"):
        for task, command in (("train", "torch-train"), ("sample", "torch-sample")):
            assert by_row[(preset, task, "ours, bf16")][-2:] == ["--compute-dtype", "bfloat16"]
            for label, flags in suite.TORCH_VARIANTS.items():
                args = by_row[(preset, task, label)]
                assert args[0] == command and all(flag in args for flag in flags)
                assert args[1:1 + len(suite.PEER_FLAGS[preset])] == suite.PEER_FLAGS[preset]
    assert "--compile" in by_row[("seed", "train", "torch port, compiled + bf16")]
    assert suite.PEER_FLAGS["gpu"][suite.PEER_FLAGS["gpu"].index("--output-head") + 1] == "conv"
    # The small network against the plain port only.
    assert {label for preset, _, label in by_row if preset == "cpu"} == {"ours", "ours, bf16", "torch port"}
    small = suite.gpu_plan(quick=True, presets=("tiny",), batch=8, n=8, steps=1, peer_device="cpu", diffusers=False)
    assert all(args[args.index("--device") + 1] == "cpu" for _, _, _, module, args, _ in small
               if module == "benchmarks.peers")


def test_run_jobs_skips_missing_diffusers_and_jobs_past_the_budget(monkeypatch, capsys):
    jobs = [job for job in suite.plan(quick=True) if job[0] == "seed"]
    ran = []

    def runner(module, args, timeout, env):
        ran.append(args[0])
        return {"train_images_per_s": 1.0, "samples_per_s": 1.0, "process_seconds": 0.0}

    monkeypatch.setattr(suite, "diffusers_available", lambda: False)
    written = []
    rows = suite.run_jobs(jobs, ("seed",), 10, None, runner, on_row=lambda rows: written.append(len(rows)))
    assert len(rows) == len(jobs) and written == list(range(1, len(jobs) + 1))
    skipped = [r for r in rows if r.get("skipped")]
    assert {r["label"] for r in skipped} == {"diffusers"} and not any(a.startswith("diffusers") for a in ran)
    suite.print_tables(rows, peak=100.0)
    out = capsys.readouterr().out
    assert "skipped: seed train diffusers: diffusers is not installed" in out
    assert next(line for line in out.splitlines() if line.startswith("diffusers")).split()[1] == "skipped"

    ran.clear()
    rows = suite.run_jobs(jobs, ("seed",), 10, budget=0, runner=runner)
    assert not ran and all(r.get("skipped") for r in rows)
    assert suite.run_jobs(jobs, ("cpu",), 10, runner=runner) == []


def test_gpu_tables_show_tflops_bf16_ratios_and_guidance(capsys):
    rows = [
        {"preset": "seed", "task": "train", "label": "ours", "train_images_per_s": 20000.0, "flops_per_image": 1e9,
         "first_step_seconds": 30.0, "device_peak_mb": 5000},
        {"preset": "seed", "task": "train", "label": "torch port", "train_images_per_s": 10000.0,
         "device_peak_mb": 7000},
        {"preset": "seed", "task": "train", "label": "ours, bf16", "train_images_per_s": 40000.0},
        {"preset": "seed", "task": "train", "label": "torch port, bf16", "train_images_per_s": 10000.0},
        {"preset": "seed", "task": "train", "label": "diffusers", "skipped": "diffusers is not installed"},
        {"preset": "seed", "task": "sample", "label": "ours", "samples_per_s": 500.0},
        {"preset": "seed", "task": "guidance", "label": "ours", "samples_per_s": 400.0,
         "guided_samples_per_s": 250.0, "guided_time_ratio": 1.6},
        {"preset": "cpu", "task": "train", "label": "ours", "skipped": "over the time budget (210 s)"},
    ]
    sizes = {preset: (suite.GPU_BATCH, suite.GPU_BATCH) for preset in suite.PRESETS}
    suite.print_tables(rows, None, sizes, suite.GPU_LABELS)
    out = capsys.readouterr().out
    lines = {}  # the first line of each label: the seed preset's main table
    for line in out.splitlines():
        if line[:1].isalpha():
            lines.setdefault(line.split("  ")[0], line)
    assert "TFLOP/s" in out and "GPU peak MB" in out and "batch 1000) and 1000 samples" in out
    assert lines["ours"].split()[4] == "20.0" and lines["ours"].split()[-1] == "5000"  # 2e4 img/s x 1 GFLOP
    assert lines["torch port"].split()[2:4] == ["10000.0", "2.00"]
    assert lines["torch port, bf16"].split()[3:5] == ["10000.0", "4.00"]  # compared with ours, bf16
    assert "skipped" in lines["diffusers"]
    guided = next(line for line in out.splitlines() if line.startswith("ours") and "1.60" in line)
    assert "400.00" in guided and "250.00" in guided
    assert "skipped: cpu train ours: over the time budget (210 s)" in out


def test_gpu_suite_without_a_gpu_is_refused(capsys):
    assert suite.main(["--device", "gpu", "--out", "/dev/null"]) == 2
    assert "--device gpu: JAX's default backend is 'cpu'" in capsys.readouterr().err


def test_cpu_info_names_the_processor_and_its_avx512(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx2 avx512f\n\n"
                    "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx2 avx512f\n")
    assert suite.cpu_info(str(info)) == {"model": "Intel(R) Xeon(R) Processor", "avx512": True}
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 avx512_bf16x\n")
    assert suite.cpu_info(str(info)) == {"model": "AMD EPYC 7B13", "avx512": False}
    assert suite.cpu_info(str(tmp_path / "missing"))["avx512"] is False


def test_paired_rounds_run_both_sides_with_the_suites_arguments_and_take_the_median_ratio():
    jobs = paired.pair_jobs("seed", 5)
    assert [label for label, *_ in jobs] == ["ours", "torch port"]
    assert jobs[0][2] == ["train", "--preset", "seed", "--batch", "128", "--steps", "5"]
    assert jobs[1][2][:1] == ["torch-train"] and "--json" in jobs[1][2] and "128" in jobs[1][2]
    sampling = paired.pair_jobs("cpu", 5, "sample")
    assert sampling[0][2] == ["sample", "--preset", "cpu", "--n", "100"]
    assert sampling[1][2][0] == "torch-sample" and sampling[1][2][-3:] == ["--n", "100", "--json"]
    summary = paired.summarize([{"ours": 90.0, "torch port": 100.0}, {"ours": 120.0, "torch port": 100.0},
                                {"ours": 100.0, "torch port": 100.0}, {"ours": 80.0, "torch port": None}])
    assert summary["ratios"] == [0.9, 1.2, 1.0]  # the round whose port failed counts for neither side
    assert summary["median_ratio"] == 1.0 and summary["median_ours"] == 100.0
    assert paired.summarize([{"ours": None, "torch port": 100.0}])["median_ratio"] is None


def test_revisions_run_the_suites_jobs_on_each_tree_and_take_the_median_ratio(monkeypatch, tmp_path):
    assert revisions.jobs("seed", "train", 5) == paired.pair_jobs("seed", 5)[0][2]
    assert revisions.jobs("cpu", "sample", 5) == paired.pair_jobs("cpu", 5, "sample")[0][2]
    seen = []
    monkeypatch.setattr(revisions, "run", lambda module, args, timeout, env, cwd: seen.append((module, env, cwd)) or {})
    revisions.measure(tmp_path, "cpu", "train", 5, 60)
    assert seen == [("benchmarks.ours", {"PYTHONPATH": str(tmp_path)}, str(tmp_path))]  # that tree's code, not ours
    summary = revisions.summarize([{"before": 100.0, "after": 99.0}, {"before": 100.0, "after": 103.0},
                                   {"before": 100.0, "after": 100.0}, {"before": None, "after": 50.0}])
    assert summary["ratios"] == [0.99, 1.03, 1.0] and summary["median_ratio"] == 1.0
    assert summary["median_before"] == 100.0 and summary["median_after"] == 100.0


def test_a_tree_without_the_package_gives_no_program_digest(tmp_path):
    assert "error" in revisions.program_digests(tmp_path, timeout=120)  # an error, never a digest to compare


def test_revisions_refuse_a_revision_that_is_not_a_commit(capsys):
    with pytest.raises(SystemExit):
        revisions.main(["--before", "no-such-revision-anywhere"])
    assert "is not a commit of this repository" in capsys.readouterr().err


def test_the_torch_ports_malloc_tunables_are_our_allocator_settings():
    from ddpm_jax.cpu import settings as xla_cpu

    tunables = dict(part.split("=") for part in suite.MALLOC_TUNABLES.split(":"))
    as_tunables = {"M_ARENA_MAX": "glibc.malloc.arena_max", "M_MMAP_MAX": "glibc.malloc.mmap_max",
                   "M_TRIM_THRESHOLD": "glibc.malloc.trim_threshold"}
    assert set(tunables) == set(as_tunables.values())
    for name, (_, value) in xla_cpu.MALLOC_SETTINGS.items():
        # mallopt's int -1 for the trim threshold is the size_t maximum the tunable spells out.
        assert int(tunables[as_tunables[name]]) == value % 2**64


def test_install_footprint_measures_size_and_import_time_of_each_environment(tmp_path, capsys):
    try:
        importlib.metadata.version("ddpm-jax")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("ddpm-jax is not installed in this environment (pip install -e .)")
    record = install_footprint.main(["--env", f"here={sys.executable}", "--rounds", "1",
                                     "--out", str(tmp_path / "f.json")])
    here = record["environments"]["here"]
    assert here["installed_mb"] > sum(here["largest_mb"].values()) / 2 > 0 and here["distributions"] > 5
    assert set(here["import_seconds"]) == {"import ddpm_jax", "import ddpm_jax; ddpm_jax.sample"}
    assert all(t["median"] > 0 for t in here["import_seconds"].values())
    assert json.loads((tmp_path / "f.json").read_text()) == record
    assert "here" in capsys.readouterr().out
