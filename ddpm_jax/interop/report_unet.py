"""The report's U-Net (:class:`~ddpm_jax.models.ReportUNet`) as one safetensors file a PyTorch module loads
(experiments/report_unet_torch.py, copied beside the file by ``python -m experiments.export``); numpy only.

No diffusers class has its max-pooling, BatchNorm and transposed convolutions, so the export is its own:
``report_unet.safetensors`` holds the weights in PyTorch's layouts under the names of that module's
``state_dict`` (BatchNorm's running statistics among them), ``config.json`` its constructor's arguments.

Naming layout (``L = model.levels``; a *block* is conv-BN-LeakyReLU, + Linear(embedding), conv-BN[-LeakyReLU]):

* ``down.{l}`` (``l = 0..L-1``): the encoder's blocks (Flax ``TimeConditionedBlock_{l}``), each followed by a 2x2
  max-pool; ``mid.0``, ``mid.1``: the two blocks at the deepest level (``TimeConditionedBlock_{L}``, ``_{L+1}``);
* ``up.{i}.upconv`` (``i = 0..L-1``, deepest first): the 2x2 stride-2 transposed convolution (``ConvTranspose_{i}``),
  then ``up.{i}.block`` on ``concat([upsampled, skip])`` (``TimeConditionedBlock_{L+2+i}``);
* ``head``: the final block (``output_head='block'``, ``TimeConditionedBlock_{2L+2}``, no last LeakyReLU) or a 3x3
  convolution (``'conv'``, ``Conv_0``);
* inside a block: ``conv1``, ``bn1``, ``time_proj``, ``conv2``, ``bn2`` (Flax ``Conv_0``, ``BatchNorm_0``,
  ``Dense_0``, ``Conv_1``, ``BatchNorm_1``); a BatchNorm's ``weight``, ``bias``, ``running_mean``, ``running_var``
  are Flax's ``scale``, ``bias`` and ``batch_stats`` ``mean``, ``var``;
* ``label_embedding.weight``: ``(num_classes + 1, time_embed_dim)``, the last row the null label (class-conditional
  networks only).

Layouts: convolutions ``(out, in, 3, 3)`` from Flax's ``(3, 3, in, out)``; Linear ``(out, in)`` from ``(in, out)``;
a transposed convolution ``(in, out, 2, 2)`` is Flax's kernel flipped in both spatial axes
(``W[c, o, a, b] = kernel[1 - a, 1 - b, c, o]``: Flax's ``ConvTranspose`` applies its kernel flipped).
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import ml_collections
import numpy as np
from safetensors.numpy import load_file, save_file

from ddpm_jax.utils.trees import get_path, set_path

WEIGHTS_FILE, CONFIG_FILE = "report_unet.safetensors", "config.json"
NEGATIVE_SLOPE, BATCHNORM_EPS = 0.01, 1e-5  # TimeConditionedBlock's LeakyReLU and BatchNorm


class Entry(NamedTuple):
    """One parameter module: its path in the Flax ``params`` (and ``batch_stats``), its name in the PyTorch module,
    and ``kind``: ``'conv'``, ``'upconv'``, ``'dense'``, ``'batchnorm'`` or ``'embed'``."""

    flax: tuple[str, ...]
    key: str
    kind: str


def report_unet_layout(model_config) -> list[Entry]:
    """Every parameter module of the ``ReportUNet`` a ``model`` section (``name='report_unet'``) describes; returns
    the :class:`Entry` list (see the module docstring for the names)."""
    levels = int(model_config.levels)
    entries: list[Entry] = []
    if int(model_config.get("num_classes", 0)):
        entries.append(Entry(("label_embedding", "embedding"), "label_embedding", "embed"))

    def block(index: int, key: str) -> None:
        name = f"TimeConditionedBlock_{index}"
        entries.extend([Entry((name, "Conv_0"), f"{key}.conv1", "conv"),
                        Entry((name, "BatchNorm_0"), f"{key}.bn1", "batchnorm"),
                        Entry((name, "Dense_0"), f"{key}.time_proj", "dense"),
                        Entry((name, "Conv_1"), f"{key}.conv2", "conv"),
                        Entry((name, "BatchNorm_1"), f"{key}.bn2", "batchnorm")])

    for level in range(levels):
        block(level, f"down.{level}")
    block(levels, "mid.0")
    block(levels + 1, "mid.1")
    for i in range(levels):
        entries.append(Entry((f"ConvTranspose_{i}",), f"up.{i}.upconv", "upconv"))
        block(levels + 2 + i, f"up.{i}.block")
    if model_config.output_head == "block":
        block(2 * levels + 2, "head")
    else:
        entries.append(Entry(("Conv_0",), "head", "conv"))
    return entries


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def state_dict(params, batch_stats, model_config) -> dict[str, np.ndarray]:
    """Our ``ReportUNet`` ``params`` and ``batch_stats`` (nested dicts of arrays) -> the PyTorch module's state
    dict (name -> float32 numpy array in PyTorch's layout)."""
    out: dict[str, np.ndarray] = {}
    for entry in report_unet_layout(model_config):
        p = get_path(params, entry.flax)
        if entry.kind == "embed":
            out[f"{entry.key}.weight"] = _f32(p["embedding"])
            continue
        if entry.kind == "batchnorm":
            stats = get_path(batch_stats, entry.flax)
            out.update({f"{entry.key}.weight": _f32(p["scale"]), f"{entry.key}.bias": _f32(p["bias"]),
                        f"{entry.key}.running_mean": _f32(stats["mean"]),
                        f"{entry.key}.running_var": _f32(stats["var"])})
            continue
        kernel = np.asarray(p["kernel"], np.float32)
        out[f"{entry.key}.weight"] = _f32({"conv": lambda k: k.transpose(3, 2, 0, 1), "dense": lambda k: k.T,
                                           "upconv": lambda k: k[::-1, ::-1].transpose(2, 3, 0, 1)}[entry.kind](kernel))
        out[f"{entry.key}.bias"] = _f32(p["bias"])
    return out


def variables_from_state_dict(tensors: dict[str, np.ndarray], model_config) -> dict:
    """The inverse of :func:`state_dict`: ``{'params': ..., 'batch_stats': ...}`` (nested dicts of float32 numpy
    arrays) from the PyTorch module's state dict; KeyError naming a missing tensor."""
    params: dict = {}
    stats: dict = {}
    for entry in report_unet_layout(model_config):
        if entry.kind == "embed":
            set_path(params, entry.flax + ("embedding",), _f32(tensors[f"{entry.key}.weight"]))
            continue
        weight, bias = np.asarray(tensors[f"{entry.key}.weight"], np.float32), _f32(tensors[f"{entry.key}.bias"])
        if entry.kind == "batchnorm":
            set_path(params, entry.flax + ("scale",), _f32(weight))
            set_path(stats, entry.flax + ("mean",), _f32(tensors[f"{entry.key}.running_mean"]))
            set_path(stats, entry.flax + ("var",), _f32(tensors[f"{entry.key}.running_var"]))
        else:
            kernel = {"conv": lambda w: w.transpose(2, 3, 1, 0), "dense": lambda w: w.T,
                      "upconv": lambda w: w.transpose(2, 3, 0, 1)[::-1, ::-1]}[entry.kind](weight)
            set_path(params, entry.flax + ("kernel",), _f32(kernel))
        set_path(params, entry.flax + ("bias",), bias)
    return {"params": params, "batch_stats": stats}


def module_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The PyTorch module's constructor arguments (``config.json``) for a run of ``model.name='report_unet'``."""
    m = config.model
    if m.name != "report_unet":
        raise ValueError(f"model.name={m.name!r} is not the report's U-Net ('report_unet').")
    channels = int(config.data.get("channels", 1))
    return {"base_channels": int(m.base_channels), "levels": int(m.levels), "time_embed_dim": int(m.time_embed_dim),
            "in_channels": channels, "out_channels": channels * (2 if m.get("learn_variance", False) else 1),
            "output_head": str(m.output_head), "num_classes": int(m.get("num_classes", 0)),
            "negative_slope": NEGATIVE_SLOPE, "batchnorm_eps": BATCHNORM_EPS}


def write_report_unet(params, batch_stats, config: ml_collections.ConfigDict, directory: str) -> list[str]:
    """Write ``directory/report_unet.safetensors`` (:func:`state_dict`) and ``directory/config.json``
    (:func:`module_config`, and the image size); returns the paths written."""
    record = {**module_config(config), "image_size": int(config.data.image_size)}
    os.makedirs(directory, exist_ok=True)
    weights = os.path.join(directory, WEIGHTS_FILE)
    save_file(state_dict(params, batch_stats, config.model), weights, metadata={"format": "pt"})
    config_path = os.path.join(directory, CONFIG_FILE)
    with open(config_path, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    return [weights, config_path]


def read_report_unet(directory: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(config.json as a dict, the tensors)`` of an export written by :func:`write_report_unet`."""
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        record = json.load(f)
    return record, load_file(os.path.join(directory, WEIGHTS_FILE))
