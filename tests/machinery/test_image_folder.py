"""Your own images: ``--image-dir`` reads a folder of PNG/JPEG files (grey or RGB, with or without class
subfolders), trains on it, samples from it, and refuses bad data with one line, exit status 2, nothing written."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

import ddpm_jax
from ddpm_jax.configs import PRESETS, get_config, validate_config
from ddpm_jax.data import image_folder
from ddpm_jax.data.image_folder import ImageFolderError, find_images, load_image_folder
from experiments import evaluate, likelihood, mnist


def _save(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path, **kwargs)


def _shapes(rng, size, rgb, kind):
    """A toy image of one of two kinds: a bright square (0) or a bright bar (1) on a dark background."""
    image = np.full((size, size, 3) if rgb else (size, size), 20, np.uint8)
    lo, hi = size // 4, 3 * size // 4
    if kind == 0:
        image[lo:hi, lo:hi] = (230, 60, 60) if rgb else 230
    else:
        image[:, size // 2 - 2: size // 2 + 2] = (60, 60, 230) if rgb else 230
    noise = rng.integers(0, 15, image.shape)
    return np.clip(image + noise, 0, 255)


@pytest.fixture
def rgb_classes(tmp_path):
    """12 RGB PNGs and JPEGs of mixed sizes in two class subfolders, 'bars' and 'squares'."""
    rng = np.random.default_rng(0)
    root = tmp_path / "rgb"
    for i in range(6):
        _save(root / "squares" / f"s{i}.png", _shapes(rng, 36 + 4 * i, True, 0))
        _save(root / "bars" / "nested" / f"b{i}.jpg", _shapes(rng, 40, True, 1), quality=95)
    (root / "bars" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def grey_flat(tmp_path):
    """10 grey PNGs directly in the folder (no labels), one of them an RGB file whose channels are equal."""
    rng = np.random.default_rng(1)
    root = tmp_path / "grey"
    for i in range(9):
        _save(root / f"img{i:02d}.PNG", _shapes(rng, 28, False, i % 2))
    grey_as_rgb = np.repeat(_shapes(rng, 30, False, 0)[..., None], 3, axis=-1)
    _save(root / "img09.png", grey_as_rgb)
    return root


def test_class_subfolders_are_the_labels_and_rgb_images_are_cropped_and_resized(rgb_classes):
    folder = load_image_folder(rgb_classes, 16)
    assert folder.images.shape == (12, 16, 16, 3) and folder.images.dtype == np.uint8
    assert folder.class_names == ("bars", "squares")  # sorted; the labels are their indices
    assert [int(y) for y in folder.labels] == [0] * 6 + [1] * 6
    assert all("/bars/" in f for f in folder.files[:6]) and not any(f.endswith(".txt") for f in folder.files)
    # A square's red centre survives the resize; a bar is blue down the middle.
    square, bar = folder.images[6].astype(int), folder.images[0].astype(int)
    assert square[8, 8, 0] > 150 > square[8, 8, 2] and bar[8, 8, 2] > 150 > bar[8, 8, 0]


def test_a_flat_folder_is_unlabelled_and_grey_images_stay_one_channel(grey_flat):
    folder = load_image_folder(grey_flat, 28)
    assert folder.images.shape == (10, 28, 28, 1) and folder.labels is None and folder.class_names == ()
    assert [p.name for p in find_images(grey_flat)][:2] == ["img00.PNG", "img01.PNG"]


@pytest.mark.parametrize("make, message", [
    (lambda root: root.mkdir(), "holds no PNG or JPEG images"),
    (lambda root: None, "no such folder"),
    (lambda root: (root.mkdir(), (root / "broken.png").write_bytes(b"\x89PNG not really")),
     "broken.png: cannot be read as an image"),
    (lambda root: (_save(root / "a.png", np.zeros((8, 8))), _save(root / "cls" / "b.png", np.zeros((8, 8)))),
     "labels do not match the images"),
])
def test_bad_data_is_one_line_exit_status_2_and_nothing_written(tmp_path, capsys, make, message):
    root = tmp_path / "images"
    make(root)
    with pytest.raises(ImageFolderError, match=message):
        load_image_folder(root, 28)
    workdir = tmp_path / "run"
    assert mnist.main(["--preset", "tiny", "--image-dir", str(root), "--workdir", str(workdir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not workdir.exists()


def test_a_truncated_jpeg_is_refused_by_name(tmp_path):
    root = tmp_path / "images"
    _save(root / "ok.jpg", np.zeros((16, 16, 3)))
    (root / "cut.jpg").write_bytes((root / "ok.jpg").read_bytes()[:40])
    with pytest.raises(ImageFolderError, match="cut.jpg: cannot be read as an image"):
        load_image_folder(root, 28)


def test_class_conditional_training_on_a_folder_then_sampling_and_evaluating_it(rgb_classes, tmp_path, capsys):
    workdir = tmp_path / "run"
    # The tiny network, made class-conditional: one label per subfolder (2), not MNIST's 10.
    assert mnist.main(["--preset", "tiny", "--image-dir", str(rgb_classes), "--class-conditional",
                       "--set", "data.image_size=16", "--set", "train.batch_size=4",
                       "--workdir", str(workdir), "--no-progress"]) == 0
    config = json.loads((workdir / "config.json").read_text())
    assert config["dataset"] == "image_folder" and config["model"]["num_classes"] == 2
    assert config["data"]["class_names"] == ["bars", "squares"] and config["data"]["channels"] == 3
    checkpoint = ddpm_jax.load_checkpoint(str(workdir))
    images = ddpm_jax.sample(checkpoint, jax.random.PRNGKey(0), 4, labels=np.array([0, 1, 0, 1]))
    assert images.shape == (4, 16, 16, 3)
    for name in ("samples.png", "samples_by_class.png", "reverse_process.png"):
        with Image.open(workdir / name) as figure:
            assert figure.mode == "RGB"
    capsys.readouterr()
    # Evaluated against the same folder: a held-out tenth is the test split, the class names label the figures.
    assert evaluate.main(["--workdir", str(workdir), "--image-dir", str(rgb_classes), "--num-samples", "8",
                          "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    report = json.loads((workdir / "eval.json").read_text())
    assert report["class_names"] == ["bars", "squares"] and report["num_samples"] == 8
    assert set(report["histogram"]) == {"0", "1"} and report["reference"]["num_examples"] == 2
    # Another folder is not this run's data.
    other = tmp_path / "other"
    _save(other / "a" / "x.png", np.zeros((16, 16, 3)))
    _save(other / "b" / "y.png", np.full((16, 16, 3), 255))
    assert evaluate.main(["--workdir", str(workdir), "--image-dir", str(other), "--num-samples", "8"]) == 2
    assert "is not the folder this run was trained on" in capsys.readouterr().err


def test_an_unlabelled_folder_trains_unconditionally_and_the_evaluation_says_what_it_can_measure(
        grey_flat, tmp_path, capsys):
    workdir = tmp_path / "run"
    # The cpu preset is class-conditional; on images without labels it trains an unconditional network.
    assert mnist.main(["--preset", "cpu", "--image-dir", str(grey_flat), "--steps", "2", "--batch-size", "4",
                       "--set", "sampling.grid_size=2", "--workdir", str(workdir), "--no-progress"]) == 0
    assert "training an unconditional network" in capsys.readouterr().out
    checkpoint = ddpm_jax.load_checkpoint(str(workdir))
    assert ddpm_jax.sample(checkpoint, jax.random.PRNGKey(0), 2, steps=5).shape == (2, 28, 28, 1)
    assert evaluate.main(["--workdir", str(workdir), "--image-dir", str(grey_flat)]) == 2
    err = capsys.readouterr().err
    assert "no class subfolders" in err and "experiments.likelihood" in err and err.count("\n") == 1
    # What it can measure: the bound on the folder's own images.
    assert likelihood.main(["--workdir", str(workdir), "--image-dir", str(grey_flat), "--no-progress"]) == 0
    result = json.loads((workdir / "likelihood.json").read_text())
    assert result["num_images"] == 10 and result["num_dims"] == 28 * 28 and result["bits_per_dim"] > 0
    assert mnist.main(["--preset", "tiny", "--image-dir", str(grey_flat), "--class-conditional",
                       "--workdir", str(tmp_path / "cond")]) == 2
    assert "--class-conditional needs labels" in capsys.readouterr().err


@pytest.mark.parametrize("rgb", [False, True])
@pytest.mark.parametrize("classes", [False, True])
def test_grey_and_rgb_load_with_and_without_class_subfolders(tmp_path, rgb, classes):
    rng = np.random.default_rng(2)
    for i in range(6):
        sub = ("round" if i % 2 else "flat") if classes else ""
        _save(tmp_path / "images" / sub / f"{i}.png", _shapes(rng, 20, rgb, i % 2))
    folder = load_image_folder(tmp_path / "images", 12)
    assert folder.images.shape == (6, 12, 12, 3 if rgb else 1)
    if classes:
        assert folder.class_names == ("flat", "round") and sorted(folder.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    else:
        assert folder.labels is None and folder.class_names == ()


def test_every_preset_accepts_a_labelled_folders_class_names():
    for preset in PRESETS:
        config = get_config(preset)
        config.data.class_names = ("a", "b", "c")
        if config.model.num_classes:  # a conditional network gets one label per class (experiments.mnist)
            config.model.num_classes = 3
        validate_config(config)


def test_an_unconditional_preset_trains_on_a_labelled_folder_and_keeps_its_classes_for_evaluation(
        rgb_classes, tmp_path, capsys):
    workdir = tmp_path / "run"
    assert mnist.main(["--preset", "tiny", "--image-dir", str(rgb_classes), "--steps", "2", "--batch-size", "4",
                       "--set", "data.image_size=16", "--set", "sampling.grid_size=2",
                       "--workdir", str(workdir), "--no-progress"]) == 0
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["num_classes"] == 0 and config["data"]["class_names"] == ["bars", "squares"]
    # Measured against the folder's held-out tenth, by its class names.
    assert evaluate.main(["--workdir", str(workdir), "--image-dir", str(rgb_classes), "--num-samples", "4",
                          "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    assert json.loads((workdir / "eval.json").read_text())["class_names"] == ["bars", "squares"]


def test_linked_class_folders_are_followed_each_real_folder_once(tmp_path):
    rng = np.random.default_rng(3)
    elsewhere, root = tmp_path / "elsewhere", tmp_path / "images"
    for i in range(3):
        _save(elsewhere / "bars" / f"b{i}.png", _shapes(rng, 20, False, 1))
        _save(root / "squares" / f"s{i}.png", _shapes(rng, 20, False, 0))
    (root / "bars").symlink_to(elsewhere / "bars", target_is_directory=True)
    (root / "squares" / "loop").symlink_to(root, target_is_directory=True)  # a link back up the tree
    folder = load_image_folder(root, 12)
    assert folder.class_names == ("bars", "squares") and [int(y) for y in folder.labels] == [0] * 3 + [1] * 3


def test_files_that_are_not_regular_files_are_skipped_before_any_read(tmp_path):
    root = tmp_path / "images"
    _save(root / "a.png", np.zeros((8, 8)))
    os.mkfifo(root / "pipe.png")  # opening it to read would wait for a writer forever
    assert [p.name for p in find_images(root)] == ["a.png"]
    assert load_image_folder(root, 8).images.shape == (1, 8, 8, 1)


def test_an_image_over_the_pixel_limit_is_refused_by_name_before_decoding(tmp_path, monkeypatch):
    root = tmp_path / "images"
    _save(root / "small.png", np.zeros((8, 8)))
    _save(root / "big.png", np.zeros((30, 40)))
    monkeypatch.setattr(image_folder, "MAX_PIXELS", 1000)
    with pytest.raises(ImageFolderError, match=r"big.png: 40x30 pixels is over the 1,000 an --image-dir image may have") as info:
        load_image_folder(root, 8)
    assert "\n" not in str(info.value)


def test_the_pixel_limit_lies_below_pils_own_decompression_bomb_error():
    # PIL raises DecompressionBombError above twice its MAX_IMAGE_PIXELS: ours refuses first, by name.
    assert image_folder.MAX_PIXELS < 2 * Image.MAX_IMAGE_PIXELS


def test_image_dir_is_never_silently_replaced_by_a_dataset_field(rgb_classes, tmp_path, capsys):
    workdir = tmp_path / "run"
    assert mnist.main(["--preset", "tiny", "--image-dir", str(rgb_classes), "--set", "dataset=cifar10",
                       "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert "--image-dir and --set dataset=cifar10 both name the training data" in err and err.count("\n") == 1
    assert not workdir.exists()
