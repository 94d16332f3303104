"""The report's U-Net in PyTorch, for the weights ``python -m experiments.export`` writes (``report_unet.py`` of an
export is this file): ``load(directory)`` returns the network in eval mode, computing what ddpm_jax's
``ReportUNet`` computes with BatchNorm's running averages.

    import torch, report_unet
    model = report_unet.load("export_dir")  # report_unet.safetensors + config.json
    eps = model(x, t, y)  # x (B, C, H, W) float32 in [-1, 1]; t (B,) int64, 0-based (index i is the paper's t = i + 1);
                          # y (B,) int64 labels 0..num_classes-1, num_classes (the null label) or None (all null),
                          # class-conditional networks only -> (B, out_channels, H, W)

A learned-variance network (``out_channels = 2 C``) outputs eps (channels ``[0, C)``) and v (``[C, 2C)``). The
module names are those of the safetensors file (docs/interop.md and ddpm_jax/interop/report_unet.py list them):
``down.{l}``, ``mid.{0,1}``, ``up.{i}.upconv``, ``up.{i}.block``, ``head``, ``label_embedding``. Needs only
torch and safetensors.
"""

from __future__ import annotations

import json
import math
import os

import torch
from torch import nn
from torch.nn import functional as F

WEIGHTS_FILE, CONFIG_FILE = "report_unet.safetensors", "config.json"


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """``(B,)`` timesteps -> ``(B, dim)`` float32 ``[sin(t f_k), cos(t f_k)]``, ``f_k = max_period^(-k / (dim/2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class Block(nn.Module):
    """conv3x3-BN-LeakyReLU, + Linear(embedding) per channel, conv3x3-BN[-LeakyReLU]: ``(B, C_in, H, W)``,
    ``emb (B, E)`` -> ``(B, C_out, H, W)``."""

    def __init__(self, c_in: int, c_out: int, embed_dim: int, final_activation: bool = True,
                 negative_slope: float = 0.01, eps: float = 1e-5):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c_out, eps=eps)
        self.time_proj = nn.Linear(embed_dim, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c_out, eps=eps)
        self.final_activation = final_activation
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.bn1(self.conv1(x)), self.negative_slope)
        h = h + self.time_proj(emb)[:, :, None, None]
        h = self.bn2(self.conv2(h))
        return F.leaky_relu(h, self.negative_slope) if self.final_activation else h


class Up(nn.Module):
    """2x2 stride-2 transposed convolution, then a :class:`Block` on ``concat([upsampled, skip])``."""

    def __init__(self, c_in: int, c_out: int, embed_dim: int, **block):
        super().__init__()
        self.upconv = nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2)
        self.block = Block(2 * c_out, c_out, embed_dim, **block)

    def forward(self, h: torch.Tensor, skip: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.upconv(h), skip], dim=1), emb)


class ReportUNet(nn.Module):
    """The report's U-Net (Allard, section 3.1), ``config.json``'s arguments: see the module docstring."""

    def __init__(self, base_channels: int = 32, levels: int = 4, time_embed_dim: int = 32, in_channels: int = 1,
                 out_channels: int | None = None, output_head: str = "block", num_classes: int = 0,
                 negative_slope: float = 0.01, batchnorm_eps: float = 1e-5):
        super().__init__()
        if output_head not in ("block", "conv"):
            raise ValueError(f"unknown output_head {output_head!r}; allowed: block, conv.")
        out_channels = out_channels or in_channels
        self.levels, self.time_embed_dim, self.num_classes = levels, time_embed_dim, num_classes
        block = dict(negative_slope=negative_slope, eps=batchnorm_eps)
        self.label_embedding = nn.Embedding(num_classes + 1, time_embed_dim) if num_classes else None
        self.down = nn.ModuleList()
        channels = in_channels
        for level in range(levels):
            self.down.append(Block(channels, base_channels * 2**level, time_embed_dim, **block))
            channels = base_channels * 2**level
        deepest = base_channels * 2**levels
        self.mid = nn.ModuleList([Block(channels, deepest, time_embed_dim, **block),
                                  Block(deepest, deepest, time_embed_dim, **block)])
        self.up = nn.ModuleList()
        channels = deepest
        for level in reversed(range(levels)):
            self.up.append(Up(channels, base_channels * 2**level, time_embed_dim, **block))
            channels = base_channels * 2**level
        if output_head == "block":
            self.head: nn.Module = Block(channels, out_channels, time_embed_dim, final_activation=False, **block)
        else:
            self.head = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.output_head = output_head

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, C, H, W)`` float in [-1, 1], ``t (B,)`` 0-based timesteps, ``y (B,)`` labels or None (the null
        label; class-conditional networks only) -> ``(B, out_channels, H, W)``."""
        factor = 2**self.levels
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"ReportUNet with levels={self.levels} needs height and width divisible by {factor}, "
                             f"got {x.shape[-2]}x{x.shape[-1]}.")
        emb = sinusoidal_embedding(t, self.time_embed_dim)
        if self.label_embedding is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.label_embedding(y)
        elif y is not None:
            raise ValueError("this ReportUNet was built without classes (num_classes=0), so it takes no labels.")
        h, skips = x, []
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
            h = F.max_pool2d(h, 2)
        for block in self.mid:
            h = block(h, emb)
        for up, skip in zip(self.up, reversed(skips)):
            h = up(h, skip, emb)
        return self.head(h, emb) if self.output_head == "block" else self.head(h)


def load(directory: str, device: str = "cpu") -> ReportUNet:
    """The network of an export folder (``config.json`` + ``report_unet.safetensors``), in eval mode."""
    from safetensors.torch import load_file  # noqa: PLC0415 (optional: only loading needs it)

    with open(os.path.join(directory, CONFIG_FILE)) as f:
        config = json.load(f)
    config.pop("image_size", None)
    model = ReportUNet(**config)
    missing, unexpected = model.load_state_dict(load_file(os.path.join(directory, WEIGHTS_FILE)), strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # a counter, not part of the function
    if missing or unexpected:
        raise ValueError(f"{directory}: the weights do not fit config.json's network: missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]}.")
    return model.to(device).eval()
