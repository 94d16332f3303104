"""Generated inputs (hypothesis) beyond the command line: image folders of any shape, the figures' class names,
and the public functions' arguments.

Each property is one of the guarantees of docs/reliability.md: a folder loads with consistent arrays or is
refused with one line naming the problem, never a traceback and never a hang (FIFOs, link loops); a class
name of any text draws; ``sample()``, ``prior_labels()`` and ``load_checkpoint()`` return what they
promise or raise one ValueError/TypeError line naming the argument. ``DDPM_JAX_FUZZ_EXAMPLES`` scales the
example counts as in tests/machinery/test_fuzz_inputs.py.
"""

import os
import re
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

import ddpm_jax
from ddpm_jax.evaluation import evaluate as evaluation
from ddpm_jax.training.checkpoint import DiffusionCheckpoint
from ddpm_jax.configs import get_config
from ddpm_jax.training.setup import create_train_state
from ddpm_jax.data.image_folder import ImageFolderError, load_image_folder

SCALE = int(os.environ.get("DDPM_JAX_FUZZ_EXAMPLES", "60")) / 60


def _settings(n: int):
    return settings(max_examples=max(1, round(n * SCALE)), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# Names a user's files and folders can have: any printable text but '/' and NUL, hidden ones included.
NAMES = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\"), min_size=1,
                max_size=8).filter(lambda s: s not in (".", "..") and len(s.encode()) < 200)
KINDS = ("png_grey", "png_rgb", "png_rgba", "png_16bit", "jpg", "text_as_png", "empty_png", "truncated_png",
         "fifo_png", "link_to_folder", "link_to_root", "broken_link", "notes_txt")
ENTRIES = st.lists(st.tuples(st.lists(NAMES, max_size=2), NAMES, st.sampled_from(KINDS), st.integers(1, 24),
                             st.integers(1, 24)), min_size=0, max_size=8)


def _make(root: Path, folders: list[str], stem: str, kind: str, width: int, height: int, rng) -> None:
    where = root.joinpath(*folders)
    where.mkdir(parents=True, exist_ok=True)
    png = where / f"{stem}.png"
    if kind in ("png_grey", "png_rgb", "png_rgba", "png_16bit", "jpg"):
        shape = {"png_grey": (height, width), "png_16bit": (height, width)}.get(kind, (height, width, 3))
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        if kind == "png_rgba":
            Image.fromarray(pixels).convert("RGBA").save(png)
        elif kind == "png_16bit":
            Image.fromarray(pixels.astype(np.uint16) * 257).save(png)
        elif kind == "jpg":
            Image.fromarray(pixels).save(where / f"{stem}.jpg", quality=90)
        else:
            Image.fromarray(pixels).save(png)
    elif kind == "text_as_png":
        png.write_text("not an image")
    elif kind == "empty_png":
        png.write_bytes(b"")
    elif kind == "truncated_png":
        Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)).save(png)
        png.write_bytes(png.read_bytes()[:20])
    elif kind == "fifo_png" and not png.exists():
        os.mkfifo(png)
    elif kind == "link_to_folder" and not (where / stem).exists():
        target = root.parent / "elsewhere" / stem
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)).save(target / "linked.png")
        (where / stem).symlink_to(target, target_is_directory=True)
    elif kind == "link_to_root" and not (where / stem).exists():
        (where / stem).symlink_to(root, target_is_directory=True)
    elif kind == "broken_link" and not png.exists():
        png.symlink_to(root / "nowhere" / "missing.png")
    elif kind == "notes_txt":
        (where / f"{stem}.txt").write_text("notes")


@_settings(80)
@given(entries=ENTRIES, size=st.integers(1, 12))
def test_any_folder_tree_loads_consistently_or_is_refused_in_one_line(entries, size, tmp_path):
    base = Path(tempfile.mkdtemp(dir=tmp_path))
    root = base / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for folders, stem, kind, width, height in entries:
        try:
            _make(root, folders, stem, kind, width, height, rng)
        except OSError:
            pass  # a generated name that collides with another entry's file, folder or link
    try:
        folder = load_image_folder(root, size)
    except ImageFolderError as e:
        event("refused")
        assert "\n" not in str(e) and str(e)
        return
    event("loaded")
    n = len(folder.files)
    assert folder.images.shape[:3] == (n, size, size) and folder.images.shape[3] in (1, 3) and n >= 1
    assert folder.images.dtype == np.uint8 and len(set(map(os.path.realpath, folder.files))) == n
    if folder.labels is not None:
        assert folder.labels.shape == (n,) and len(folder.class_names) >= 2
        assert set(folder.labels.tolist()) <= set(range(len(folder.class_names)))


@_settings(30)
@given(names=st.lists(st.text(max_size=10), min_size=2, max_size=4, unique=True))
def test_figures_draw_any_class_names(names, tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(len(names)), size=12)
    result = evaluation.measure(probs, rng.normal(size=(12, 4)), rng.normal(size=(12, 4)), precision_recall=False)
    evaluation.save_histogram_plot(result, str(tmp_path / "histogram.png"), class_names=tuple(names))
    evaluation.save_least_confident(np.zeros((12, 8, 8, 1), np.uint8), probs, str(tmp_path / "least.png"), k=4,
                                    class_names=tuple(names))
    assert (tmp_path / "histogram.png").stat().st_size > 0 and (tmp_path / "least.png").stat().st_size > 0


@pytest.fixture(scope="module")
def checkpoint():
    config = get_config("tiny")
    config.model.num_classes = 3
    config.data.label_frequencies = (0.5, 0.25, 0.25)
    config.sampling.unconditional = "label_prior"
    return DiffusionCheckpoint.from_train_state(create_train_state(config), config)


COUNTS = st.one_of(st.sampled_from([1, 2, np.int64(2), jnp.int32(1), np.array(2)]),
                   st.sampled_from([0, -1, 2.0, True, "2", None, jnp.float32(2.0), np.array([2]), 10**30]))
KEYS = st.one_of(st.just(jax.random.PRNGKey(0)), st.just(jax.random.key(1)),
                 st.sampled_from([0, "key", None, np.zeros(2, np.int32), np.zeros(3, np.uint32), 1.5]))
OPTIONS = st.fixed_dictionaries({}, optional={
    "steps": st.sampled_from([2, 10, 0, -3, 2.5, "2", 11]),
    "method": st.sampled_from(["ancestral", "ddim", "dpm_solver++", "sde_dpm_solver++", "euler", 3]),
    "guidance_scale": st.sampled_from([0.0, 1.0, -1.0, float("nan"), "1"]),
    "labels": st.sampled_from([0, 2, 3, -1, [0, 1], "a"]),
    "batch_size": st.sampled_from([1, 2, 0, 1.5]),
})


@_settings(80)
@given(n=COUNTS, key=KEYS, options=OPTIONS)
def test_sample_returns_n_images_or_one_line_naming_the_argument(checkpoint, n, key, options):
    try:
        images = ddpm_jax.sample(checkpoint, key, n, **options)
    except (ValueError, TypeError) as e:
        event(f"refused: {type(e).__name__}")
        message = str(e)
        assert "\n" not in message and message
        assert re.search(r"\b(n|key|steps|method|guidance_scale|labels|batch_size|order|spacing)\b", message), message
        return
    event("sampled")
    count = int(np.asarray(n))
    assert images.shape == (count, 28, 28, 1) and bool(jnp.isfinite(images).all())


@_settings(40)
@given(step=st.sampled_from([None, 2, 4, np.int64(4), jnp.int32(2), 3, "4", 4.0, -1, True, [4], 2**40]),
       weights=st.sampled_from(["ema", "raw", "best", None, 1]))
def test_load_checkpoint_loads_the_step_asked_or_says_why_not_in_one_line(trained_tiny_run, step, weights):
    try:
        loaded = ddpm_jax.load_checkpoint(str(trained_tiny_run), step=step, weights=weights)
    except (ValueError, TypeError, FileNotFoundError) as e:
        event(f"refused: {type(e).__name__}")
        assert "\n" not in str(e) and ("step" in str(e) or "weights" in str(e))
        return
    assert loaded.step == (4 if step is None else int(np.asarray(step)))
