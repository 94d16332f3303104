"""Weights out to diffusers and PyTorch, and back (ddpm_jax/interop/, experiments/export.py,
experiments/import_diffusers.py, experiments/report_unet_torch.py; docs/interop.md).

diffusers' UNet2DModel and DDPMScheduler, and a plain PyTorch module, are the independent computation: the same
random inputs through our network and through theirs agree to float32 rounding. Every parameter is random (our
networks zero-initialize their output convolutions, which would make any two outputs equal), BatchNorm statistics
are away from (0, 1) so eval mode really uses them. Tiny shapes: 8x8 images, 8 base channels.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import ddpm_jax
from ddpm_jax.configs import build_model, get_config, schedule_from_config, validate_config, variable_shapes
from ddpm_jax.interop import diffusers as interop
from ddpm_jax.interop import report_unet as report_interop
from ddpm_jax.interop.workdir import write_run
from ddpm_jax.training.checkpoint import DiffusionCheckpoint, load_checkpoint
from experiments import check_export as check_cli
from experiments import export as export_cli
from experiments import import_diffusers as import_cli

# float32 rounding through a few dozen layers, relative to the outputs' scale (max |output|).
TOLERANCE = 1e-4


def _ddpm_config(num_classes=0, learn_variance=False, num_heads=1, schedule="linear", variance="beta",
                 mean="x0_clip"):
    """A tiny DDPMUNet run config: 8x8 grey images, levels of 8 and 16 channels, attention at 4x4 and in the
    middle (16 channels), a 1x1 shortcut where the width changes, T = 10."""
    c = get_config("ddpm")
    c.data.image_size, c.data.native_size = 8, 8
    c.model.base_channels, c.model.norm_groups, c.model.levels = 8, 4, 1
    c.model.channel_mult, c.model.attention_resolutions = (1, 2), (4,)
    c.model.num_classes, c.model.learn_variance, c.model.num_heads = num_classes, learn_variance, num_heads
    c.diffusion.schedule, c.diffusion.num_timesteps = schedule, 10
    c.sampling.variance, c.sampling.mean, c.sampling.strip_every = variance, mean, 5
    validate_config(c)
    return c


def _report_config(num_classes=0, output_head="block", learn_variance=False):
    c = get_config("cpu")
    c.data.image_size, c.data.native_size = 8, 8
    c.model.base_channels, c.model.levels, c.model.time_embed_dim = 4, 2, 8
    c.model.num_classes, c.model.output_head, c.model.learn_variance = num_classes, output_head, learn_variance
    c.diffusion.num_timesteps, c.sampling.strip_every = 10, 5
    validate_config(c)
    return c


def _random_variables(config, seed=0):
    """Every variable of the network ``config`` describes, drawn at random (numpy float32): weights N(0, 0.3^2),
    BatchNorm variances in [0.5, 1.5]."""
    rng = np.random.default_rng(seed)
    shapes = jax.tree.map(lambda s: s.shape, variable_shapes(config), is_leaf=lambda s: hasattr(s, "shape"))
    paths = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda s: isinstance(s, tuple))[0]
    out: dict = {}
    for path, shape in paths:
        names = [k.key for k in path]
        value = (rng.uniform(0.5, 1.5, shape) if names[-1] == "var" else 0.3 * rng.standard_normal(shape))
        node = out
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = value.astype(np.float32)
    out.setdefault("batch_stats", {})
    return out


def _inputs(config, batch=3, seed=1):
    rng = np.random.default_rng(seed)
    size, channels = int(config.data.image_size), int(config.data.channels)
    x = rng.standard_normal((batch, size, size, channels)).astype(np.float32)
    t = rng.integers(0, int(config.diffusion.num_timesteps), batch)
    classes = int(config.model.num_classes)
    y = np.array([0, classes, classes - 1][:batch]) if classes else None  # a label, the null label, another
    return x, t, y


def _ours(config, variables, x, t, y):
    """Our network's output, NCHW numpy."""
    out = build_model(config.model).apply(variables, jnp.asarray(x), jnp.asarray(t, jnp.int32),
                                          None if y is None else jnp.asarray(y, jnp.int32), train=False)
    return np.asarray(out).transpose(0, 3, 1, 2)


def _max_diff(theirs, ours) -> float:
    assert theirs.shape == ours.shape
    scale = float(np.abs(ours).max())
    assert scale > 0.1, "the outputs are trivially small: not every parameter was randomized"
    return float(np.abs(theirs - ours).max()) / scale


def _same_trees(a, b) -> bool:
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    return ta == tb and all(np.array_equal(np.asarray(x), np.asarray(y)) and np.asarray(x).dtype == np.asarray(y).dtype
                            for x, y in zip(la, lb))


# Export to diffusers.

EXPORT_CASES = {"conditional": dict(num_classes=3),
                "learned_variance_two_heads": dict(learn_variance=True, num_heads=2)}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_exported_unet_matches_ours_in_diffusers(case, tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    config = _ddpm_config(**EXPORT_CASES[case])
    variables = _random_variables(config)
    interop.write_pipeline(variables["params"], config, str(tmp_path))
    unet = diffusers.UNet2DModel.from_pretrained(str(tmp_path / "unet")).eval()
    x, t, y = _inputs(config)
    with torch.no_grad():
        theirs = unet(torch.tensor(x.transpose(0, 3, 1, 2)), torch.tensor(t),
                      class_labels=None if y is None else torch.tensor(y)).sample.numpy()
    diff = _max_diff(theirs, _ours(config, variables, x, t, y))
    print(f"{case}: max |diffusers - ours| / max |ours| = {diff:.2e}")
    assert diff < TOLERANCE


def test_export_round_trips_to_equal_parameters(tmp_path):
    config = _ddpm_config(num_classes=3, num_heads=2)
    params = _random_variables(config)["params"]
    interop.write_pipeline(params, config, str(tmp_path))
    tensors = load_file(str(tmp_path / "unet" / interop.WEIGHTS_FILE))
    assert all(a.dtype == np.float32 for a in tensors.values())
    assert _same_trees(interop.unet_params(tensors, config.model, 8), params)
    # The configs come back too: the same network and schedule.
    unet = json.loads((tmp_path / "unet" / "config.json").read_text())
    scheduler = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    back = interop.run_config_from_diffusers(unet, scheduler)
    for field in ("base_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "num_heads",
                  "norm_groups", "num_classes", "learn_variance", "dropout"):
        assert tuple(np.atleast_1d(back.model[field])) == tuple(np.atleast_1d(config.model[field])), field
    assert (back.diffusion.schedule, back.sampling.variance, back.sampling.mean) == ("linear", "beta", "x0_clip")
    np.testing.assert_array_equal(schedule_from_config(back).betas, schedule_from_config(config).betas)


@pytest.mark.parametrize("schedule, variance, mean", [("linear", "beta", "x0_clip"), ("cosine", "beta_tilde", "eps")])
def test_diffusers_pipeline_samples_from_export(schedule, variance, mean, tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    config = _ddpm_config(schedule=schedule, variance=variance, mean=mean)
    interop.write_pipeline(_random_variables(config)["params"], config, str(tmp_path))
    pipeline = diffusers.DDPMPipeline.from_pretrained(str(tmp_path))
    sched = pipeline.scheduler
    np.testing.assert_array_equal(sched.betas.numpy(), np.asarray(schedule_from_config(config).betas))
    assert sched.config.variance_type == {"beta": "fixed_large", "beta_tilde": "fixed_small"}[variance]
    assert sched.config.clip_sample == (mean == "x0_clip")
    # The named schedule (beta_schedule, for readability) gives the same betas as the exact ones.
    named = diffusers.DDPMScheduler(**{**dict(sched.config), "trained_betas": None})
    np.testing.assert_allclose(named.betas.numpy(), sched.betas.numpy(), rtol=1e-5, atol=1e-8)
    images = pipeline(batch_size=2, num_inference_steps=2, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


# Import from diffusers.

SUPPORTED_UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                      attention_head_dim=None, norm_num_groups=4, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=0,
                      num_class_embeds=4, dropout=0.1)
SUPPORTED_SCHEDULER = dict(num_train_timesteps=10, beta_schedule="squaredcos_cap_v2", variance_type="fixed_small",
                           clip_sample=False, prediction_type="epsilon")


def test_imported_diffusers_model_matches_it(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**SUPPORTED_UNET).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    unet.save_pretrained(str(tmp_path / "unet"))
    diffusers.DDPMScheduler(**SUPPORTED_SCHEDULER).save_pretrained(str(tmp_path / "scheduler"))
    unet_config, scheduler_config, tensors = interop.read_pipeline(str(tmp_path))
    config = interop.run_config_from_diffusers(unet_config, scheduler_config)
    m = config.model
    assert (m.base_channels, tuple(m.channel_mult), m.attention_resolutions, m.num_classes, m.dropout) == \
        (8, (1, 2), (4,), 3, 0.1)
    assert (config.diffusion.schedule, config.sampling.variance, config.sampling.mean) == \
        ("cosine", "beta_tilde", "eps")
    np.testing.assert_allclose(np.asarray(schedule_from_config(config).betas),
                               diffusers.DDPMScheduler(**SUPPORTED_SCHEDULER).betas.numpy(), rtol=1e-6)
    params = interop.unet_params(tensors, m, 8)
    x, t, y = _inputs(config)
    with torch.no_grad():
        theirs = unet(torch.tensor(x.transpose(0, 3, 1, 2)), torch.tensor(t), class_labels=torch.tensor(y)).sample
    diff = _max_diff(theirs.numpy(), _ours(config, {"params": params}, x, t, y))
    print(f"imported: max |diffusers - ours| / max |ours| = {diff:.2e}")
    assert diff < TOLERANCE


REFUSED_UNET = [
    ("down_block_types", ("DownBlock2D", "CrossAttnDownBlock2D")),
    ("up_block_types", ("UpBlock2D", "UpBlock2D")),  # attention in the down path only
    ("resnet_time_scale_shift", "scale_shift"),
    ("flip_sin_to_cos", True),
    ("freq_shift", 1),
    ("norm_eps", 1e-5),
    ("time_embedding_type", "fourier"),
    ("class_embed_type", "timestep"),
    ("attention_head_dim", 3),  # divides neither 16-channel attention
    ("block_out_channels", (8, 12)),
    ("out_channels", 3),
    ("upsample_type", "resnet"),
]
REFUSED_SCHEDULER = [
    ("beta_schedule", "scaled_linear"),
    ("prediction_type", "v_prediction"),
    ("variance_type", "fixed_small_log"),
    ("variance_type", "learned_range"),  # the network outputs no variance
    ("thresholding", True),
    ("rescale_betas_zero_snr", True),
    ("trained_betas", [0.1, 0.2, 0.15]),
]


@pytest.mark.parametrize("where, field, value", [("unet", f, v) for f, v in REFUSED_UNET]
                         + [("scheduler", f, v) for f, v in REFUSED_SCHEDULER])
def test_import_refuses_what_we_cannot_express(where, field, value):
    unet, scheduler = dict(SUPPORTED_UNET), dict(SUPPORTED_SCHEDULER)
    # (The supported configs themselves import: test_imported_diffusers_model_matches_it.)
    (unet if where == "unet" else scheduler)[field] = value
    with pytest.raises(ValueError, match=rf"{field}=") as info:
        interop.run_config_from_diffusers(unet, scheduler)
    assert "supported" in str(info.value)
    if field != "trained_betas":
        assert repr(value if not isinstance(value, tuple) else list(value))[:12] in str(info.value) or \
            repr(value)[:12] in str(info.value)


def test_import_reads_our_schedules_from_trained_betas():
    """trained_betas equal to what one of our schedules gives (to rtol 1e-6) become that schedule."""
    config = _ddpm_config(schedule="cosine")
    betas = np.asarray(schedule_from_config(config).betas, np.float64)  # float32 values: within rtol 1e-6
    scheduler = {**SUPPORTED_SCHEDULER, "beta_schedule": "linear", "trained_betas": betas.tolist()}
    back = interop.sections_from_scheduler_config(scheduler, learn_variance=False)["diffusion"]
    assert back == {"schedule": "cosine", "num_timesteps": 10, "cosine_s": 0.008, "max_beta": 0.999}
    linear = np.linspace(2e-4, 0.05, 7).tolist()
    back = interop.sections_from_scheduler_config({**scheduler, "trained_betas": linear}, learn_variance=False)
    assert back["diffusion"]["schedule"] == "linear" and back["diffusion"]["num_timesteps"] == 7


def test_export_refuses_what_diffusers_cannot_express():
    config = _ddpm_config()
    bad = copy.deepcopy(config)
    bad.model.channel_mult = (2, 2)
    with pytest.raises(ValueError, match=r"model.channel_mult=\(2, 2\)"):
        interop.unet_config(bad)
    bad = _ddpm_config(num_heads=2)
    bad.model.attention_resolutions = (8, 4)  # heads of 4 channels at 8x8, of 8 at 4x4 and in the middle
    with pytest.raises(ValueError, match="model.num_heads=2"):
        interop.unet_config(bad)
    with pytest.raises(ValueError, match="model.name='report_unet'"):
        interop.unet_config(_report_config())


# The report's U-Net, for PyTorch.

REPORT_CASES = {"conditional": dict(num_classes=3), "unconditional_conv_head_learned_variance":
                dict(output_head="conv", learn_variance=True)}


@pytest.mark.parametrize("case", sorted(REPORT_CASES))
def test_report_unet_torch_module_matches_ours(case, tmp_path):
    torch = pytest.importorskip("torch")
    config = _report_config(**REPORT_CASES[case])
    variables = _random_variables(config)
    checkpoint = DiffusionCheckpoint(params=variables["params"], batch_stats=variables["batch_stats"],
                                     config=ml_collections.FrozenConfigDict(config.to_dict()), weights="raw")
    written = export_cli.export(checkpoint, str(tmp_path))
    assert {os.path.basename(p) for p in written} == {"report_unet.safetensors", "config.json", "report_unet.py",
                                                      "scheduler_config.json", "README.md"}
    spec = importlib.util.spec_from_file_location("exported_report_unet", tmp_path / "report_unet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.load(str(tmp_path))
    assert not model.training
    x, t, y = _inputs(config)
    with torch.no_grad():
        theirs = model(torch.tensor(x.transpose(0, 3, 1, 2)), torch.tensor(t),
                       None if y is None else torch.tensor(y)).numpy()
    diff = _max_diff(theirs, _ours(config, variables, x, t, y))
    print(f"report {case}: max |torch - ours| / max |ours| = {diff:.2e}")
    assert diff < TOLERANCE
    back = report_interop.variables_from_state_dict(load_file(str(tmp_path / "report_unet.safetensors")), config.model)
    assert _same_trees(back, variables)


# The command lines, on saved runs.


def test_export_and_import_programs_round_trip_a_saved_run(tmp_path, capsys):
    """Run -> export -> import -> a run that load_checkpoint and sample take, with the same weights."""
    config = _ddpm_config(num_classes=3)
    params = _random_variables(config)["params"]
    write_run(str(tmp_path / "run"), config, params)
    assert export_cli.main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    for name in ("unet/config.json", f"unet/{interop.WEIGHTS_FILE}", "scheduler/scheduler_config.json",
                 "model_index.json", "README.md"):
        assert (tmp_path / "out" / name).is_file(), name
    assert import_cli.main(["--model", str(tmp_path / "out"), "--workdir", str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "config.json").is_file()
    checkpoint = load_checkpoint(str(tmp_path / "back"))
    assert _same_trees(checkpoint.ema_params, params) and _same_trees(checkpoint.params, params)
    assert checkpoint.config.model.num_classes == 3 and checkpoint.config.diffusion.num_timesteps == 10
    images = ddpm_jax.sample(checkpoint, jax.random.PRNGKey(0), 2, labels=1)  # as from any run
    assert images.shape == (2, 8, 8, 1) and np.isfinite(np.asarray(images)).all()
    capsys.readouterr()
    # One error line and status 2: a second import into the same run, a workdir without a run, a folder without a model.
    assert import_cli.main(["--model", str(tmp_path / "out"), "--workdir", str(tmp_path / "back")]) == 2
    assert export_cli.main(["--workdir", str(tmp_path / "nothing"), "--out", str(tmp_path / "o2")]) == 2
    assert import_cli.main(["--model", str(tmp_path / "run"), "--workdir", str(tmp_path / "b2")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("error: ") for e in errors), errors
    assert "already holds checkpoints" in errors[0] and "no checkpoints" in errors[1]
    assert "is not a UNet2DModel config" in errors[2]
    assert not (tmp_path / "o2").exists() and not (tmp_path / "b2" / "checkpoints").exists()


def test_report_unet_program_exports_a_saved_run(tmp_path):
    config = _report_config(num_classes=3)
    variables = _random_variables(config)
    write_run(str(tmp_path / "run"), config, variables["params"], variables["batch_stats"])
    assert export_cli.main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
                            "--weights", "raw"]) == 0
    tensors = load_file(str(tmp_path / "out" / "report_unet.safetensors"))
    np.testing.assert_array_equal(tensors["down.0.bn1.running_var"],
                                  variables["batch_stats"]["TimeConditionedBlock_0"]["BatchNorm_0"]["var"])
    assert tensors["label_embedding.weight"].shape == (4, 8)
    record = json.loads((tmp_path / "out" / "config.json").read_text())
    assert record["num_classes"] == 3 and record["in_channels"] == 1 and record["image_size"] == 8
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "NCHW" in readme and "0-based" in readme and "null label" in readme


@pytest.mark.parametrize("network", ["ddpm_unet", "report_unet"])
def test_check_export_passes_an_export_and_fails_one_whose_weights_were_changed(network, tmp_path, capsys):
    pytest.importorskip("torch")
    if network == "ddpm_unet":
        pytest.importorskip("diffusers")
        config = _ddpm_config(num_classes=3)
        weights = tmp_path / "out" / "unet" / interop.WEIGHTS_FILE
    else:
        config = _report_config(num_classes=3)
        weights = tmp_path / "out" / "report_unet.safetensors"
    variables = _random_variables(config)
    write_run(str(tmp_path / "run"), config, variables["params"], variables["batch_stats"])
    assert export_cli.main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    check = ["--workdir", str(tmp_path / "run"), "--export", str(tmp_path / "out"), "--batch", "4"]
    capsys.readouterr()
    assert check_cli.main(check) == 0
    assert ": agree" in capsys.readouterr().out
    tensors = load_file(str(weights))
    name = min(n for n in tensors if n.startswith(("conv_out.", "head.")) and n.endswith(".weight"))
    tensors[name] = tensors[name] + np.float32(0.05)  # the output layer's weights nudged: the outputs must tell
    save_file(tensors, str(weights))
    assert check_cli.main(check) == 1
    assert "DIFFER" in capsys.readouterr().out
    assert check_cli.main(["--workdir", str(tmp_path / "run"), "--export", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.startswith("error: --export")
