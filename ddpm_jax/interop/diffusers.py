"""Ho et al.'s U-Net (:class:`~ddpm_jax.models.DDPMUNet`) as diffusers' ``UNet2DModel``, and the schedule as its
``DDPMScheduler``: the state-dict mapping and the configs, both ways, in numpy and JSON alone (no torch, no diffusers).

The two networks are the same function (improved-diffusion's U-Net, which diffusers' ``UNet2DModel`` reproduces):
``conv_in``; per level ``num_res_blocks`` residual blocks (each followed by one-head self-attention where that
level's feature-map height is in ``attention_resolutions``: ``AttnDownBlock2D``, else ``DownBlock2D``) and a
stride-2 3x3 convolution except at the last level; a middle of block, attention, block; the decoder's
``num_res_blocks + 1`` blocks per level on ``concat([h, skip])`` with nearest x2 upsampling and a 3x3 convolution;
GroupNorm-SiLU-``conv_out``. The time embedding is ``[sin(t f_k), cos(t f_k)]``, ``f_k = 10000^(-k / half)``
(diffusers' ``flip_sin_to_cos=False, freq_shift=0``) through Dense-SiLU-Dense; a class-conditional network adds a
learned label embedding of ``num_classes + 1`` rows (the last one the null label) after that MLP
(``num_class_embeds``). Flax's GroupNorm epsilon is 1e-6 (``norm_eps``). Timesteps are 0-based in both.

Layouts: Flax convolution kernels are ``(kh, kw, in, out)``, PyTorch's ``(out, in, kh, kw)``; Flax Dense kernels
``(in, out)``, PyTorch Linear weights ``(out, in)``; our attention's one ``qkv`` Dense of ``3C`` outputs is
diffusers' ``to_q``, ``to_k``, ``to_v`` side by side (columns ``[0, C)``, ``[C, 2C)``, ``[2C, 3C)``, each laid out
head by head), ``proj`` is ``to_out.0``; a block's ``skip`` Dense is the 1x1 ``conv_shortcut``.
:func:`unet_layout` lists every parameter's two names; docs/interop.md has the table.

Schedules: ours ``linear`` is diffusers' ``linear``, ours ``cosine`` with ``s = 0.008`` and ``max_beta = 0.999`` its
``squaredcos_cap_v2``; the exported scheduler carries our exact betas as ``trained_betas`` as well.
Variances: ``sampling.variance`` ``'beta'`` (or ``'fixed_large'``) is ``fixed_large``, ``'beta_tilde'`` is
``fixed_small``, a learned variance (``model.learn_variance``) is ``learned_range``: both split the output into
eps and v (channels ``[0, C)`` and ``[C, 2C)``) and take ``log sigma^2 = f log beta_t + (1 - f) log beta-tilde_t``
with ``f = (v + 1) / 2`` (Nichol & Dhariwal 2021, eq. 15). The one difference: we clip ``f`` to ``[0, 1]``, diffusers
does not, so the two agree wherever ``v`` lies in ``[-1, 1]``, the range the parameterization is for (outside it
diffusers leaves the interval between the bounds; ours stays at the nearer one). ``sampling.mean`` ``'x0_clip'`` is
``clip_sample=True`` (range 1), ``'eps'`` is ``clip_sample=False``; the prediction is always ``'epsilon'``.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import ml_collections
import numpy as np
from safetensors.numpy import load_file, save_file

from ddpm_jax.configs import get_config, validate_config
from ddpm_jax.diffusion.schedules import betas_for
from ddpm_jax.utils.trees import get_path, set_path

# The diffusers release whose UNet2DModel and DDPMScheduler configs these are written for.
DIFFUSERS_VERSION = "0.42.1"
GROUPNORM_EPS = 1e-6  # flax.linen.GroupNorm's epsilon
COSINE_S, COSINE_MAX_BETA = 0.008, 0.999  # diffusers' squaredcos_cap_v2
UNET_DIR, SCHEDULER_DIR = "unet", "scheduler"
WEIGHTS_FILE, CONFIG_FILE = "diffusion_pytorch_model.safetensors", "config.json"
SCHEDULER_FILE, MODEL_INDEX_FILE = "scheduler_config.json", "model_index.json"
VARIANCES = {"beta": "fixed_large", "fixed_large": "fixed_large", "beta_tilde": "fixed_small",
             "learned": "learned_range"}
DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")


class Entry(NamedTuple):
    """One parameter module of the network: its path in our Flax params, its prefix in diffusers' state dict, and
    ``kind``: ``'conv'`` (kernel/bias -> weight/bias), ``'dense'``, ``'shortcut'`` (a Dense as a 1x1 conv),
    ``'norm'`` (scale/bias -> weight/bias), ``'qkv'`` (one Dense -> to_q, to_k, to_v) or ``'embed'``."""

    flax: tuple[str, ...]
    key: str
    kind: str


# The network's two sides, module by module.


def _attention_levels(model_config, image_size: int) -> list[bool]:
    """Whether each level's blocks are followed by attention: its feature-map height is in attention_resolutions."""
    resolutions = {int(r) for r in model_config.attention_resolutions}
    return [image_size // 2**level in resolutions for level in range(len(model_config.channel_mult))]


def unet_layout(model_config, image_size: int) -> list[Entry]:
    """Every parameter module of the ``DDPMUNet`` a ``model`` section (``name='ddpm_unet'``) describes at
    ``image_size``, in the order the network creates them; returns the :class:`Entry` list both directions use.

    Flax names modules by type and creation order (``ResidualBlock_3``, ``Conv3x3_1``, ...); this walks the
    network as :meth:`ddpm_jax.models.DDPMUNet.__call__` does and names each module on both sides.
    """
    counters: dict[str, int] = {}

    def flax_name(kind: str) -> str:
        counters[kind] = counters.get(kind, 0) + 1
        return f"{kind}_{counters[kind] - 1}"

    entries: list[Entry] = []

    def block(prefix: str, c_in: int, c_out: int) -> None:
        name = flax_name("ResidualBlock")
        entries.extend([Entry((name, "GroupNorm_0"), f"{prefix}.norm1", "norm"),
                        Entry((name, "Conv3x3_0"), f"{prefix}.conv1", "conv"),
                        Entry((name, "Dense_0"), f"{prefix}.time_emb_proj", "dense"),
                        Entry((name, "GroupNorm_1"), f"{prefix}.norm2", "norm"),
                        Entry((name, "Conv3x3_1"), f"{prefix}.conv2", "conv")])
        if c_in != c_out:
            entries.append(Entry((name, "skip"), f"{prefix}.conv_shortcut", "shortcut"))

    def attention(prefix: str) -> None:
        name = flax_name("AttentionBlock")
        entries.extend([Entry((name, "GroupNorm_0"), f"{prefix}.group_norm", "norm"),
                        Entry((name, "qkv"), prefix, "qkv"),
                        Entry((name, "proj"), f"{prefix}.to_out.0", "dense")])

    base, mult = int(model_config.base_channels), [int(m) for m in model_config.channel_mult]
    blocks, levels = int(model_config.num_res_blocks), len(mult)
    attends = _attention_levels(model_config, image_size)
    # The time MLP: Dense(4C)(silu(Dense(4C)(emb))) creates the outer Dense first.
    entries.append(Entry(("Dense_1",), "time_embedding.linear_1", "dense"))
    entries.append(Entry(("Dense_0",), "time_embedding.linear_2", "dense"))
    if int(model_config.get("num_classes", 0)):
        entries.append(Entry(("label_embedding", "embedding"), "class_embedding", "embed"))
    entries.append(Entry((flax_name("Conv3x3"),), "conv_in", "conv"))
    channels, skips = base, [base]
    for level in range(levels):
        for j in range(blocks):
            block(f"down_blocks.{level}.resnets.{j}", channels, base * mult[level])
            channels = base * mult[level]
            if attends[level]:
                attention(f"down_blocks.{level}.attentions.{j}")
            skips.append(channels)
        if level < levels - 1:
            entries.append(Entry((flax_name("Conv"),), f"down_blocks.{level}.downsamplers.0.conv", "conv"))
            skips.append(channels)
    block("mid_block.resnets.0", channels, channels)
    attention("mid_block.attentions.0")
    block("mid_block.resnets.1", channels, channels)
    for i, level in enumerate(reversed(range(levels))):
        for j in range(blocks + 1):
            block(f"up_blocks.{i}.resnets.{j}", channels + skips.pop(), base * mult[level])
            channels = base * mult[level]
            if attends[level]:
                attention(f"up_blocks.{i}.attentions.{j}")
        if level > 0:
            entries.append(Entry((flax_name("Conv3x3"),), f"up_blocks.{i}.upsamplers.0.conv", "conv"))
    entries.append(Entry(("GroupNorm_0",), "conv_norm_out", "norm"))
    entries.append(Entry((flax_name("Conv3x3"),), "conv_out", "conv"))
    return entries


def _leaf_paths(tree, prefix=()) -> set[tuple[str, ...]]:
    if not hasattr(tree, "items"):
        return {prefix}
    return set().union(*(_leaf_paths(v, prefix + (str(k),)) for k, v in tree.items())) if tree else set()


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def unet_state_dict(params, model_config, image_size: int) -> dict[str, np.ndarray]:
    """Our ``DDPMUNet`` ``params`` (a nested dict of arrays) -> diffusers ``UNet2DModel``'s state dict (name ->
    float32 numpy array in PyTorch's layout), every parameter used exactly once; ValueError if ``params`` holds a
    module the layout does not, or misses one."""
    out: dict[str, np.ndarray] = {}
    used: set[tuple[str, ...]] = set()
    for entry in unet_layout(model_config, image_size):
        module = get_path(params, entry.flax)
        if entry.kind == "embed":
            out[f"{entry.key}.weight"] = _f32(module["embedding"])
            used.add(entry.flax + ("embedding",))
            continue
        names = ("scale", "bias") if entry.kind == "norm" else ("kernel", "bias")
        used |= {entry.flax + (n,) for n in names}
        weight, bias = np.asarray(module[names[0]], np.float32), _f32(module["bias"])
        if entry.kind == "qkv":
            c = weight.shape[0]
            for i, name in enumerate(("to_q", "to_k", "to_v")):
                out[f"{entry.key}.{name}.weight"] = _f32(weight[:, i * c:(i + 1) * c].T)
                out[f"{entry.key}.{name}.bias"] = _f32(bias[i * c:(i + 1) * c])
            continue
        out[f"{entry.key}.weight"] = _f32({"conv": lambda w: w.transpose(3, 2, 0, 1), "norm": lambda w: w,
                                           "dense": lambda w: w.T,
                                           "shortcut": lambda w: w.T[:, :, None, None]}[entry.kind](weight))
        out[f"{entry.key}.bias"] = bias
    left = sorted("/".join(p) for p in _leaf_paths(params) - used)
    if left:
        raise ValueError(f"these parameters are not part of the DDPMUNet the config describes: {left[:6]}.")
    return out


def unet_params(state_dict: dict[str, np.ndarray], model_config, image_size: int) -> dict:
    """The inverse of :func:`unet_state_dict`: diffusers ``UNet2DModel``'s state dict (name -> array) -> our
    ``DDPMUNet`` params (a nested dict of float32 numpy arrays). ValueError naming the keys that are missing or
    that our network has no place for."""
    params: dict = {}
    used: set[str] = set()
    missing: list[str] = []

    def take(name: str) -> np.ndarray:
        if name not in state_dict:
            missing.append(name)
            return np.zeros((0,), np.float32)
        used.add(name)
        return np.asarray(state_dict[name], np.float32)

    for entry in unet_layout(model_config, image_size):
        if entry.kind == "embed":
            set_path(params, entry.flax + ("embedding",), _f32(take(f"{entry.key}.weight")))
            continue
        if entry.kind == "qkv":
            weights = [take(f"{entry.key}.{n}.weight") for n in ("to_q", "to_k", "to_v")]
            biases = [take(f"{entry.key}.{n}.bias") for n in ("to_q", "to_k", "to_v")]
            if not missing:
                set_path(params, entry.flax + ("kernel",), _f32(np.concatenate([w.T for w in weights], axis=1)))
                set_path(params, entry.flax + ("bias",), _f32(np.concatenate(biases)))
            continue
        weight, bias = take(f"{entry.key}.weight"), take(f"{entry.key}.bias")
        if missing:
            continue
        if entry.kind == "norm":
            set_path(params, entry.flax + ("scale",), _f32(weight))
        else:
            kernel = {"conv": lambda w: w.transpose(2, 3, 1, 0), "dense": lambda w: w.T,
                      "shortcut": lambda w: w[:, :, 0, 0].T}[entry.kind](weight)
            set_path(params, entry.flax + ("kernel",), _f32(kernel))
        set_path(params, entry.flax + ("bias",), _f32(bias))
    extra = sorted(set(state_dict) - used)
    if missing or extra:
        raise ValueError(f"the UNet2DModel weights do not fit the network their config describes: missing "
                         f"{missing[:6]}, unexpected {extra[:6]}.")
    return params


# The configs, ours -> diffusers.


def check_exportable(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the field if a run's network cannot be written as a ``UNet2DModel``."""
    m = config.model
    if m.name != "ddpm_unet":
        raise ValueError(f"model.name={m.name!r} has no diffusers class (UNet2DModel is model.name='ddpm_unet'); "
                         "export it with ddpm_jax.interop.report_unet (python -m experiments.export does).")
    if int(m.channel_mult[0]) != 1:
        raise ValueError(f"model.channel_mult={tuple(m.channel_mult)} starts with {m.channel_mult[0]}: UNet2DModel's "
                         "conv_in and time embedding are block_out_channels[0] wide, ours model.base_channels; "
                         "only a first multiplier of 1 is supported.")
    _attention_head_dim(config)


def _attention_head_dim(config) -> int | None:
    """diffusers' ``attention_head_dim`` for our ``model.num_heads``: None for one head (each attention then has
    one head of all its channels), else the head width, which must be the same at every attention."""
    m = config.model
    heads = int(m.num_heads)
    if heads == 1:
        return None
    attends = _attention_levels(m, int(config.data.image_size))
    widths = {int(m.base_channels) * int(k) for k, a in zip(m.channel_mult, attends) if a}
    widths.add(int(m.base_channels) * int(m.channel_mult[-1]))  # the middle's attention
    if len(widths) != 1:
        raise ValueError(f"model.num_heads={heads} over attentions of {sorted(widths)} channels gives heads of "
                         f"{sorted(w // heads for w in widths)} channels, but UNet2DModel has one attention_head_dim "
                         "for all of them; supported: num_heads=1, or attention only at levels of one width.")
    return widths.pop() // heads


def unet_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The ``UNet2DModel`` config (``unet/config.json``) of a run's ``DDPMUNet`` (see :func:`check_exportable`)."""
    check_exportable(config)
    m, size = config.model, int(config.data.image_size)
    channels = int(config.data.get("channels", 1))
    attends = _attention_levels(m, size)
    num_classes = int(m.get("num_classes", 0))
    return {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": size, "in_channels": channels,
        "out_channels": channels * (2 if m.get("learn_variance", False) else 1),
        "center_input_sample": False, "time_embedding_type": "positional", "time_embedding_dim": None,
        "freq_shift": 0, "flip_sin_to_cos": False,
        "down_block_types": [DOWN_BLOCKS[a] for a in attends], "mid_block_type": "UNetMidBlock2D",
        "up_block_types": [UP_BLOCKS[a] for a in reversed(attends)],
        "block_out_channels": [int(m.base_channels) * int(k) for k in m.channel_mult],
        "layers_per_block": int(m.num_res_blocks), "mid_block_scale_factor": 1, "downsample_padding": 1,
        "downsample_type": "conv", "upsample_type": "conv", "dropout": float(m.dropout), "act_fn": "silu",
        "attention_head_dim": _attention_head_dim(config), "norm_num_groups": int(m.norm_groups),
        "attn_norm_num_groups": None, "norm_eps": GROUPNORM_EPS, "resnet_time_scale_shift": "default",
        "add_attention": True, "class_embed_type": None, "num_class_embeds": num_classes + 1 if num_classes else None,
        "num_train_timesteps": None,
    }


def scheduler_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The ``DDPMScheduler`` config (``scheduler/scheduler_config.json``) of a run: our betas exactly, as
    ``trained_betas`` (float64 values; diffusers reads them as float32), and the schedule's name beside them."""
    d, s = config.diffusion, config.sampling
    betas = betas_for(d.schedule, int(d.num_timesteps), beta_start=d.beta_start, beta_end=d.beta_end,
                      cosine_s=d.cosine_s, max_beta=d.max_beta)
    learned = bool(config.model.get("learn_variance", False))
    return {
        "_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": int(d.num_timesteps),
        "beta_start": float(d.beta_start), "beta_end": float(d.beta_end),
        "beta_schedule": "linear" if d.schedule == "linear" else "squaredcos_cap_v2",
        "trained_betas": [float(b) for b in betas],
        # A learned-variance network's output holds v: diffusers must split it off whatever sampling.variance says.
        "variance_type": "learned_range" if learned else VARIANCES[s.variance],
        "clip_sample": s.mean == "x0_clip", "clip_sample_range": 1.0, "prediction_type": "epsilon",
        "thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0,
        "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False,
    }


def model_index() -> dict[str, Any]:
    """``model_index.json`` of a ``DDPMPipeline`` folder: its ``unet`` and ``scheduler`` classes."""
    return {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
            "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}


def _write_json(path: str, record: dict) -> str:
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    return path


def write_scheduler(config: ml_collections.ConfigDict, directory: str) -> str:
    """Write ``directory/scheduler/scheduler_config.json`` for a run's schedule; returns its path."""
    os.makedirs(os.path.join(directory, SCHEDULER_DIR), exist_ok=True)
    return _write_json(os.path.join(directory, SCHEDULER_DIR, SCHEDULER_FILE), scheduler_config(config))


def write_pipeline(params, config: ml_collections.ConfigDict, directory: str) -> list[str]:
    """Write a ``DDPMPipeline`` folder of a ``DDPMUNet`` run: ``unet/config.json``,
    ``unet/diffusion_pytorch_model.safetensors`` (``params`` mapped by :func:`unet_state_dict`),
    ``scheduler/scheduler_config.json`` and ``model_index.json``. Returns the paths written."""
    unet = unet_config(config)  # refuses what diffusers cannot express before anything is written
    tensors = unet_state_dict(params, config.model, int(config.data.image_size))
    os.makedirs(os.path.join(directory, UNET_DIR), exist_ok=True)
    weights = os.path.join(directory, UNET_DIR, WEIGHTS_FILE)
    save_file(tensors, weights, metadata={"format": "pt"})
    return [_write_json(os.path.join(directory, UNET_DIR, CONFIG_FILE), unet), weights,
            write_scheduler(config, directory), _write_json(os.path.join(directory, MODEL_INDEX_FILE), model_index())]


# The configs, diffusers -> ours.


def _refuse(field: str, value, supported: str, where: str = "UNet2DModel") -> None:
    raise ValueError(f"{where} config {field}={value!r} cannot be expressed by our DDPMUNet; supported: {supported}.")


def _require(ok: bool, field: str, value, supported: str, where: str = "UNet2DModel") -> None:
    if not ok:
        _refuse(field, value, supported, where)


# UNet2DModel fields that must hold one value: (field, the value, what it means for us).
_FIXED_UNET_FIELDS = (
    ("center_input_sample", False, "False (inputs already in [-1, 1])"),
    ("time_embedding_type", "positional", "'positional' (the sinusoidal embedding)"),
    ("time_embedding_dim", None, "None (4 x block_out_channels[0])"),
    ("freq_shift", 0, "0 (frequencies 10000^(-k / half))"),
    ("flip_sin_to_cos", False, "False ([sin, cos] order)"),
    ("mid_block_type", "UNetMidBlock2D", "'UNetMidBlock2D'"),
    ("mid_block_scale_factor", 1, "1"),
    ("downsample_padding", 1, "1"),
    ("downsample_type", "conv", "'conv' (a stride-2 3x3 convolution)"),
    ("upsample_type", "conv", "'conv' (nearest x2, then a 3x3 convolution)"),
    ("act_fn", "silu", "'silu'"),
    ("norm_eps", GROUPNORM_EPS, f"{GROUPNORM_EPS} (Flax GroupNorm's epsilon)"),
    ("resnet_time_scale_shift", "default", "'default' (the time embedding added, not scale_shift)"),
    ("add_attention", True, "True (attention in the middle block)"),
    ("class_embed_type", None, "None (a learned nn.Embedding of labels, with num_class_embeds)"),
)
# diffusers' defaults of the fields a saved config may leave out.
_UNET_DEFAULTS = {"center_input_sample": False, "time_embedding_type": "positional", "time_embedding_dim": None,
                  "freq_shift": 0, "flip_sin_to_cos": True, "mid_block_type": "UNetMidBlock2D",
                  "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
                  "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu", "attention_head_dim": 8,
                  "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
                  "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
                  "num_class_embeds": None, "layers_per_block": 2, "in_channels": 3, "out_channels": 3}
_SCHEDULER_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                       "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True,
                       "clip_sample_range": 1.0, "prediction_type": "epsilon", "thresholding": False,
                       "rescale_betas_zero_snr": False}


def _equal(a, b) -> bool:
    if isinstance(b, float) and isinstance(a, (int, float)) and not isinstance(a, bool):
        return bool(np.isclose(a, b, rtol=1e-9, atol=0))
    return type(a) is type(b) and a == b if isinstance(b, bool) else a == b


def model_section_from_unet_config(unet: dict[str, Any]) -> dict[str, Any]:
    """Our ``model`` and ``data`` fields for a ``UNet2DModel`` config (a dict, as its ``config.json``); returns
    ``{'model': {...}, 'data': {...}}``. ValueError naming the field, its value and what is supported for
    anything our ``DDPMUNet`` cannot express."""
    u = {**_UNET_DEFAULTS, **unet}
    for field, value, supported in _FIXED_UNET_FIELDS:
        _require(_equal(u[field], value), field, u[field], supported)
    size = u.get("sample_size")
    if isinstance(size, (list, tuple)):
        _require(len(size) == 2 and size[0] == size[1], "sample_size", size, "square images (one size)")
        size = size[0]
    _require(isinstance(size, int) and size > 0, "sample_size", size, "the image size, an integer")
    channels = list(u.get("block_out_channels", ()))
    down, up = list(u.get("down_block_types", ())), list(u.get("up_block_types", ()))
    _require(len(channels) >= 1 and all(isinstance(c, int) and c > 0 for c in channels), "block_out_channels",
             channels, "positive integers, one per level")
    base = channels[0]
    _require(all(c % base == 0 for c in channels), "block_out_channels", channels,
             f"multiples of block_out_channels[0]={base} (our channel_mult)")
    _require(len(down) == len(channels) and all(t in DOWN_BLOCKS for t in down), "down_block_types", down,
             f"one of {', '.join(DOWN_BLOCKS)} per level")
    attends = [t == "AttnDownBlock2D" for t in down]
    expected_up = [UP_BLOCKS[a] for a in reversed(attends)]
    _require(up == expected_up, "up_block_types", up,
             f"{expected_up}: {', '.join(UP_BLOCKS)}, with attention at the levels where the down path has it")
    _require(size % 2 ** (len(channels) - 1) == 0, "sample_size", size,
             f"a size divisible by 2**{len(channels) - 1} (one halving per level)")
    _require(u["attn_norm_num_groups"] in (None, u["norm_num_groups"]), "attn_norm_num_groups",
             u["attn_norm_num_groups"], f"None or norm_num_groups={u['norm_num_groups']}")
    groups = u["norm_num_groups"]
    _require(isinstance(groups, int) and groups > 0 and all(c % groups == 0 for c in channels), "norm_num_groups",
             groups, "an integer dividing every block's width")
    blocks = u["layers_per_block"]
    _require(isinstance(blocks, int) and blocks >= 1, "layers_per_block", blocks, "an integer >= 1")
    in_channels, out_channels = u["in_channels"], u["out_channels"]
    _require(in_channels in (1, 3), "in_channels", in_channels, "1 (grey) or 3 (RGB)")
    _require(out_channels in (in_channels, 2 * in_channels), "out_channels", out_channels,
             f"in_channels={in_channels} (eps), or twice it (eps and a learned variance)")
    widths = [c for c, a in zip(channels, attends) if a] + [channels[-1]]  # the middle's attention too
    head_dim = u["attention_head_dim"]
    if isinstance(head_dim, (list, tuple)):
        _require(len(set(head_dim)) == 1, "attention_head_dim", head_dim, "one head width for every level")
        head_dim = head_dim[0]
    if head_dim is None:
        heads = 1
    else:
        _require(isinstance(head_dim, int) and head_dim > 0 and all(w % head_dim == 0 for w in widths),
                 "attention_head_dim", head_dim, f"None (one head) or a width dividing the attentions' {widths}")
        counts = sorted({w // head_dim for w in widths})
        _require(len(counts) == 1, "attention_head_dim", head_dim,
                 f"None (one head), or one that gives every attention the same number of heads (ours: "
                 f"model.num_heads); this gives {counts} heads over attentions of {sorted(set(widths))} channels")
        heads = counts[0]
    _require(all(c % heads == 0 for c in channels), "attention_head_dim", head_dim,
             f"a number of heads ({heads}) that divides every block's width {channels}")
    num_class_embeds = u["num_class_embeds"]
    _require(num_class_embeds is None or (isinstance(num_class_embeds, int) and num_class_embeds >= 2),
             "num_class_embeds", num_class_embeds, "None (unconditional) or num_classes + 1 (the last row the null "
             "label), at least 2")
    dropout = u["dropout"]
    _require(isinstance(dropout, (int, float)) and 0 <= dropout < 1, "dropout", dropout, "a rate in [0, 1)")
    model = {
        "name": "ddpm_unet", "base_channels": base, "levels": len(channels) - 1,
        "channel_mult": tuple(c // base for c in channels), "num_res_blocks": blocks,
        "attention_resolutions": tuple(size // 2**level for level, a in enumerate(attends) if a),
        "dropout": float(dropout), "num_heads": heads, "norm_groups": groups,
        "learn_variance": out_channels == 2 * in_channels,
        "num_classes": num_class_embeds - 1 if num_class_embeds else 0,
    }
    return {"model": model, "data": {"image_size": size, "channels": in_channels}}


def _candidate_schedules(s: dict[str, Any], num_timesteps: int) -> list[dict[str, Any]]:
    """Our diffusion sections whose betas a scheduler's ``trained_betas`` may be: the linear schedule between its
    beta_start and beta_end (and between the betas' own ends), the cosine one of squaredcos_cap_v2."""
    betas = s["trained_betas"]
    found = [{"schedule": "linear", "beta_start": float(s["beta_start"]), "beta_end": float(s["beta_end"])},
             {"schedule": "linear", "beta_start": float(betas[0]), "beta_end": float(betas[-1])},
             {"schedule": "cosine", "cosine_s": COSINE_S, "max_beta": COSINE_MAX_BETA}]
    return [{"num_timesteps": num_timesteps, **c} for c in found]


def _betas_of(diffusion: dict[str, Any]) -> np.ndarray:
    return betas_for(diffusion["schedule"], diffusion["num_timesteps"], beta_start=diffusion.get("beta_start", 1e-4),
                     beta_end=diffusion.get("beta_end", 0.02), cosine_s=diffusion.get("cosine_s", COSINE_S),
                     max_beta=diffusion.get("max_beta", COSINE_MAX_BETA))


def sections_from_scheduler_config(scheduler: dict[str, Any], learn_variance: bool) -> dict[str, Any]:
    """Our ``diffusion`` and ``sampling`` fields for a ``DDPMScheduler`` config (a dict, as its
    ``scheduler_config.json``) serving a network that does (not) learn its variance; returns
    ``{'diffusion': {...}, 'sampling': {...}}``. ValueError naming the field for a schedule, variance, prediction
    or clipping we cannot reproduce."""
    s = {**_SCHEDULER_DEFAULTS, **scheduler}
    where = "DDPMScheduler"
    _require(s["prediction_type"] == "epsilon", "prediction_type", s["prediction_type"],
             "'epsilon' (our networks predict the noise)", where)
    _require(s["thresholding"] is False, "thresholding", s["thresholding"], "False (we clip x_0 to [-1, 1])", where)
    _require(s["rescale_betas_zero_snr"] is False, "rescale_betas_zero_snr", s["rescale_betas_zero_snr"],
             "False", where)
    _require(isinstance(s["clip_sample"], bool), "clip_sample", s["clip_sample"], "True or False", where)
    if s["clip_sample"]:
        _require(_equal(s["clip_sample_range"], 1.0), "clip_sample_range", s["clip_sample_range"],
                 "1.0 (we clip x_0 to [-1, 1])", where)
    variance = s["variance_type"]
    if learn_variance:
        _require(variance == "learned_range", "variance_type", variance,
                 "'learned_range' for a UNet2DModel whose out_channels are twice its in_channels", where)
    else:
        _require(variance in ("fixed_small", "fixed_large"), "variance_type", variance,
                 "'fixed_small' (sigma^2 = beta-tilde) or 'fixed_large' (sigma^2 = beta); 'learned_range' needs a "
                 "UNet2DModel with out_channels twice its in_channels", where)
    num_timesteps = s["num_train_timesteps"]
    if s["trained_betas"] is not None:
        betas = np.asarray(s["trained_betas"], np.float64)
        _require(betas.ndim == 1 and len(betas) >= 1, "trained_betas", f"shape {betas.shape}", "a list of betas",
                 where)
        diffusion = next((c for c in _candidate_schedules(s, len(betas))
                          if np.allclose(betas, _betas_of(c), rtol=1e-6)), None)
        shown = f"[{betas[0]:.6g}, ..., {betas[-1]:.6g}] ({len(betas)} values)"
        _require(diffusion is not None, "trained_betas", shown,
                 "the betas of one of our schedules: linear (between beta_start and beta_end, or between the betas' "
                 f"own ends) or cosine with s={COSINE_S}, max_beta={COSINE_MAX_BETA}, to rtol 1e-6", where)
    elif s["beta_schedule"] == "linear":
        diffusion = {"schedule": "linear", "num_timesteps": num_timesteps, "beta_start": float(s["beta_start"]),
                     "beta_end": float(s["beta_end"])}
    elif s["beta_schedule"] == "squaredcos_cap_v2":
        diffusion = {"schedule": "cosine", "num_timesteps": num_timesteps, "cosine_s": COSINE_S,
                     "max_beta": COSINE_MAX_BETA}
    else:
        _refuse("beta_schedule", s["beta_schedule"], "'linear' or 'squaredcos_cap_v2' (or trained_betas one of "
                "them gives)", where)
    sampling = {"variance": {"fixed_small": "beta_tilde", "fixed_large": "beta", "learned_range": "learned"}[variance],
                "mean": "x0_clip" if s["clip_sample"] else "eps"}
    return {"diffusion": diffusion, "sampling": sampling}


def run_config_from_diffusers(unet: dict[str, Any], scheduler: dict[str, Any], *, dataset: str | None = None,
                              native_size: int | None = None) -> ml_collections.ConfigDict:
    """A run config (validated) for a ``UNet2DModel`` config and a ``DDPMScheduler`` config (dicts).

    Starts from the ``ddpm`` preset (grey images) or ``cifar10`` (RGB) and sets the fields the two configs give;
    ``dataset`` (default: the preset's, MNIST or CIFAR-10) is what evaluation compares samples with,
    ``native_size`` (default: the image size) the images' own size. ValueError for anything we cannot express.
    """
    sections = model_section_from_unet_config(unet)
    sections.update(sections_from_scheduler_config(scheduler, sections["model"]["learn_variance"]))
    config = get_config("cifar10" if sections["data"]["channels"] == 3 else "ddpm")
    config.data.native_size = sections["data"]["image_size"] if native_size is None else native_size
    if dataset is not None:
        config.dataset = dataset
    config.data.random_flip = False  # nothing is trained
    for section, fields in sections.items():
        for field, value in fields.items():
            config[section][field] = value
    config.sampling.strip_every = min(int(config.sampling.strip_every), int(config.diffusion.num_timesteps))
    validate_config(config)
    return config


def read_pipeline(directory: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    """``(unet config, scheduler config, unet state dict)`` of a diffusers folder: a ``DDPMPipeline`` folder
    (``unet/`` and ``scheduler/``) or a ``UNet2DModel`` folder with a ``scheduler_config.json`` beside or above it.
    FileNotFoundError naming what is missing; weights must be safetensors (``diffusion_pytorch_model.safetensors``)."""
    directory = os.path.abspath(directory)
    unet_dir = os.path.join(directory, UNET_DIR) if os.path.isdir(os.path.join(directory, UNET_DIR)) else directory
    candidates = [os.path.join(directory, SCHEDULER_DIR, SCHEDULER_FILE), os.path.join(directory, SCHEDULER_FILE),
                  os.path.join(os.path.dirname(unet_dir), SCHEDULER_DIR, SCHEDULER_FILE)]
    scheduler_path = next((p for p in candidates if os.path.isfile(p)), None)
    config_path, weights_path = os.path.join(unet_dir, CONFIG_FILE), os.path.join(unet_dir, WEIGHTS_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no UNet2DModel config in {directory} (looked for {config_path}); give a "
                                "DDPMPipeline folder (unet/, scheduler/) or a UNet2DModel folder.")
    with open(config_path) as f:
        unet = json.load(f)
    if not isinstance(unet, dict) or unet.get("_class_name", "UNet2DModel") != "UNet2DModel" \
            or "block_out_channels" not in unet:
        name = unet.get("_class_name") if isinstance(unet, dict) else type(unet).__name__
        lacks = "" if isinstance(unet, dict) and "block_out_channels" in unet else ", no block_out_channels"
        raise ValueError(f"{config_path} is not a UNet2DModel config (_class_name={name!r}{lacks}); "
                         "supported: a UNet2DModel saved by save_pretrained.")
    if not os.path.isfile(weights_path):
        found = sorted(os.listdir(unet_dir))
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {unet_dir} (found {found}); save the model with "
                                "save_pretrained(..., safe_serialization=True).")
    if scheduler_path is None:
        raise FileNotFoundError(f"no DDPMScheduler config for {directory} (looked for {', '.join(candidates)}).")
    with open(scheduler_path) as f:
        scheduler = json.load(f)
    if scheduler.get("_class_name", "DDPMScheduler") != "DDPMScheduler":
        _refuse("_class_name", scheduler["_class_name"], "DDPMScheduler (its config fields)", "scheduler")
    return unet, scheduler, load_file(weights_path)
