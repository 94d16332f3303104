"""PNG figures: the sample grid and the reverse-process strip of images in [-1, 1] (grey or RGB), and a run's
loss curves."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 pixels, rounding as a saved image would."""
    return np.clip(np.round((np.asarray(images, dtype=np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def tile(images: np.ndarray, nrow: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile ``(N, H, W, C)`` uint8 images into one array: ``(rows*(H+pad)+pad, ...)`` grey for C = 1,
    with a last axis of 3 for RGB (C = 3)."""
    n, h, w, channels = images.shape
    if channels not in (1, 3):
        raise ValueError(f"images must be grey (C=1) or RGB (C=3) to tile; got {channels} channels.")
    ncol = -(-n // nrow)
    canvas = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, channels), pad_value, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = images[i]
    return canvas[..., 0] if channels == 1 else canvas


def save_grid(images: np.ndarray, path: str, nrow: int = 10, scale: int = 3) -> None:
    """Save ``(N, H, W, C)`` images in [-1, 1] (grey or RGB) as a grid PNG (the report's Figure 4), ``nrow`` per row."""
    canvas = tile(to_uint8(images), nrow)
    Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST).save(path)


def save_reverse_process(frames: np.ndarray, path: str, num_timesteps: int, every: int, scale: int = 3) -> None:
    """Save a reverse-process figure (the report's Figure 5): one row per sample, x_T left to x_0 right.

    ``frames``: ``(F, B, H, W, C)`` in [-1, 1] (grey or RGB), as ``sample(..., return_every=every)``
    returns them: the state after 0, every, 2*every, ... and all ``num_timesteps``
    reverse steps. Each column is labelled with the paper's index of that state.
    """
    num_frames, batch, h, w = frames.shape[:4]
    rows = np.transpose(to_uint8(frames), (1, 0, 2, 3, 4)).reshape((batch * num_frames,) + frames.shape[2:])
    canvas = tile(rows, nrow=num_frames)
    image = Image.fromarray(canvas)
    image = image.resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    steps_taken = list(range(0, num_timesteps, every))[: num_frames - 1] + [num_timesteps]
    header = Image.new("L", (image.width, 14 * scale // 2 + 4), 255)
    draw = ImageDraw.Draw(header)
    font = ImageFont.load_default()
    for col, steps in enumerate(steps_taken):
        x = (2 + col * (w + 2)) * scale
        draw.text((x, 2), f"x_{num_timesteps - steps}", fill=0, font=font)
    figure = Image.new(image.mode, (image.width, image.height + header.height), "white")
    figure.paste(header, (0, 0))
    figure.paste(image, (0, header.height))
    figure.save(path)


def save_loss_curves(runs: dict[str, dict], path: str, quarter_names: list[str]) -> None:
    """Save the loss curves of one run or several on one figure: the loss, its four quarters of t, the learning rate.

    ``runs``: label -> ``{"images": (L,) images seen at each log line, "loss": (L,), "loss_t_q0".."loss_t_q3":
    (L,) each, "learning_rate": (L,)}`` (NaN where a line has no value); ``quarter_names``: the quarters' titles
    (e.g. ``'t in 0..24'``). One panel per curve, one colour per run, the losses on a log scale against the
    training images seen, so runs of other batch sizes or lengths line up.
    """
    fig = Figure(figsize=(12, 6.5), layout="constrained")
    axes = fig.subplots(2, 3, sharex=True).ravel()
    panels = [("loss", "loss (all t)")] + [(f"loss_t_q{q}", f"loss, {name}") for q, name in enumerate(quarter_names)]
    panels += [("learning_rate", "learning rate")]
    for ax, (field, title) in zip(axes, panels):
        for label, curves in runs.items():
            ax.plot(curves["images"], curves[field], label=label, linewidth=1.2)
        ax.set_title(title, fontsize=10)
        if field != "learning_rate":
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[3:]:
        ax.set_xlabel("training images seen")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=100)
