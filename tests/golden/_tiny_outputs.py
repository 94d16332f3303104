"""What the golden test compares: two tiny runs trained through the command line and sampled through ``ddpm_jax.sample``.

Only the public surface is used (``ddpm_jax.cli.train.main``, ``ddpm_jax.load_checkpoint``, ``ddpm_jax.sample``), so the
same code computes the outputs before and after any change inside the package. The stored arrays were written by
this file under the test session's settings (tests/conftest.py); rewrite them only when a change is meant to alter
outputs, and say so in CHANGELOG.md::

    DDPM_JAX_WRITE_GOLDEN=1 python -m pytest tests/golden
"""

from __future__ import annotations

import gzip
import platform
from importlib import metadata
from pathlib import Path

import jax
import numpy as np

GOLDEN = Path(__file__).with_name("tiny_outputs.npz")
PLATFORM = Path(__file__).with_name("tiny_outputs_platform.json")

# Two runs that between them reach every network and every part of training the presets use: the report's U-Net
# (BatchNorm, max-pooling, transposed convolutions) with the min-SNR weighting, and Ho et al.'s (GroupNorm, attention,
# dropout) class-conditional, with a learned variance.
RUNS = {
    "report_unet": ["--set", "train.loss_weighting=min_snr"],
    "ddpm_unet": ["--set", "model.name=ddpm_unet", "--set", "model.base_channels=8", "--set", "model.channel_mult=(1,2)",
                  "--set", "model.num_res_blocks=1", "--set", "model.attention_resolutions=(14,)",
                  "--set", "model.norm_groups=4", "--set", "model.num_classes=10", "--set", "model.learn_variance=True"],
}
# Sampler settings per run: name -> keyword arguments of ddpm_jax.sample (8 images, key 1).
SAMPLERS = {
    "report_unet": {
        "ancestral": {},
        "ancestral_beta_tilde_eps_mean": {"variance": "beta_tilde", "mean": "eps"},
        "ancestral_batch_statistics_raw_weights": {"batchnorm": "batch", "weights": "raw"},
        "respaced_5": {"steps": 5, "method": "ancestral"},
        "ddim_5": {"steps": 5, "method": "ddim"},
        "ddim_5_eta1": {"steps": 5, "method": "ddim", "eta": 1.0},
        "dpm_solver_5": {"steps": 5, "method": "dpm_solver++"},
        "sde_dpm_solver_5": {"steps": 5, "method": "sde_dpm_solver++"},
    },
    "ddpm_unet": {
        "learned_variance_label_prior": {},
        "guided_sevens": {"labels": 7, "guidance_scale": 2.0},
        "null_label": {"unconditional": "null"},
        "dpm_solver_5_labels": {"steps": 5, "labels": np.arange(8) % 10},
    },
}


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def _digits_like(rng: np.random.Generator, n: int) -> np.ndarray:
    """Smooth blobs (a network fits them a little, so gradients are not noise alone)."""
    yy, xx = np.mgrid[0:28, 0:28]
    centres = rng.uniform(6, 22, size=(n, 2))
    return (np.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 30.0) * 255).astype(np.uint8)


def platform_facts() -> dict:
    """What exact float32 equality depends on besides the code: the XLA build and the processor."""
    flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        line = next((l for l in cpuinfo.read_text().splitlines() if l.startswith("flags")), "")
        flags = " ".join(sorted(f for f in line.split() if f.startswith(("avx", "fma", "amx"))))
    return {"jax": jax.__version__, "jaxlib": metadata.version("jaxlib"), "machine": platform.machine(),
            "cpu_vector_flags": flags, "backend": jax.default_backend()}


def compute(workdir: Path) -> dict[str, np.ndarray]:
    """Train both runs (4 steps each) under ``workdir`` and return every array the golden file holds."""
    from ddpm_jax.cli import train as train_cli
    import ddpm_jax

    rng = np.random.default_rng(0)
    data = workdir / "idx"
    data.mkdir(parents=True)
    _write_idx(data / "train-images-idx3-ubyte.gz", _digits_like(rng, 48))
    _write_idx(data / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 48))
    _write_idx(data / "t10k-images-idx3-ubyte.gz", _digits_like(rng, 12))
    _write_idx(data / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 12))
    out = {}
    for run, extra in RUNS.items():
        run_dir = workdir / run
        code = train_cli.main(["--preset", "tiny", "--idx-dir", str(data), "--workdir", str(run_dir), "--steps", "4",
                               "--no-progress", *extra])
        assert code == 0, f"training the {run} run exited with {code}"
        checkpoint = ddpm_jax.load_checkpoint(str(run_dir))
        for part in ("params", "ema_params", "batch_stats"):
            for path, leaf in jax.tree_util.tree_flatten_with_path(getattr(checkpoint, part))[0]:
                out[f"{run}/checkpoint/{part}/{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
        for name, kwargs in SAMPLERS[run].items():
            out[f"{run}/sample/{name}"] = np.asarray(ddpm_jax.sample(checkpoint, jax.random.PRNGKey(1), 8, **kwargs))
        images, frames = ddpm_jax.sample(checkpoint, jax.random.PRNGKey(2), 4, return_every=5)
        out[f"{run}/sample/frames"] = np.asarray(frames)
    return out
