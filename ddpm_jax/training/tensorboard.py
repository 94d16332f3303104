"""TensorBoard event files for a run, written without TensorFlow.

A run writes ``WORKDIR/tensorboard/events.out.tfevents.*`` (``train.tensorboard``, on by default):
every logged line's scalars (:data:`SCALARS`, the loss per quarter of the timestep range) and the
sample grids drawn during training (:mod:`ddpm_jax.evaluation.previews`). Watch it with
``tensorboard --logdir WORKDIR``.

The records are written by TensorBoard's own record writer
(``tensorboard.summary.writer.record_writer``, the framing and checksums ``torch.utils.tensorboard``
writes with) into a plain file, as the summary protocol buffers TensorBoard reads; nothing imports
TensorFlow or PyTorch. (TensorBoard's ``EventFileWriter`` opens its file through TensorFlow whenever
TensorFlow is installed, and tensorboardX imports PyTorch whenever that is.) tensorboard is a
dependency of the package; where it cannot be imported
anyway, :func:`open_events` returns None and the run goes on with ``metrics.jsonl`` alone.
"""

from __future__ import annotations

import io
import os
import socket
import time

import numpy as np
from PIL import Image

from ddpm_jax.training.loop import timestep_quarters

try:
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter
except ImportError:  # event files are optional: metrics.jsonl holds the same numbers
    RecordWriter = None

EVENTS_DIR = "tensorboard"

# metrics.jsonl field -> TensorBoard tag (the quarters' tags are added per run: :func:`scalar_tags`).
SCALARS = {
    "loss": "loss/all_t",
    "learning_rate": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "epoch": "train/epoch",
    "images_per_s": "speed/images_per_s",
}


def scalar_tags(num_timesteps: int) -> dict[str, str]:
    """Every logged field written to TensorBoard and its tag, the quarters named by their (0-based) timesteps:
    ``loss_t_q0`` of T = 100 is ``loss/t_000-024``."""
    width = len(str(num_timesteps - 1))
    quarters = {f"loss_t_q{q}": f"loss/t_{lo:0{width}d}-{hi - 1:0{width}d}"
                for q, (lo, hi) in enumerate(timestep_quarters(num_timesteps)) if hi > lo}
    return {**SCALARS, **quarters}


class EventWriter:
    """One run's event files: scalars from the log lines, images from the sample grids.

    Nothing is opened until :meth:`start`, which training calls with the step it starts from: a resumed run
    hides the events a killed one wrote after its last checkpoint (a ``SessionLog.START`` event at the next
    step, as tensorboardX's ``purge_step`` writes), as ``metrics.jsonl`` drops those lines.
    """

    def __init__(self, logdir: str, num_timesteps: int):
        self.logdir = logdir
        self.tags = scalar_tags(num_timesteps)
        self._writer = None

    def start(self, step: int) -> None:
        """Open the event file; ``step``: where training starts (0 for a new run)."""
        if self._writer is None:
            os.makedirs(self.logdir, exist_ok=True)
            name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.0"
            self._writer = RecordWriter(open(os.path.join(self.logdir, name), "ab"))  # closed by close()
            self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
            if step:  # TensorBoard then hides what earlier files hold from step + 1 on: a killed run's last lines
                start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
                self._write(event_pb2.Event(wall_time=time.time(), step=step + 1, session_log=start))

    def scalars(self, record: dict) -> None:
        """Write a ``metrics.jsonl`` record's numbers at its ``step`` (fields that are None are left out)."""
        if self._writer is None:
            return
        values = [summary_pb2.Summary.Value(tag=tag, simple_value=float(record[field]))
                  for field, tag in self.tags.items() if record.get(field) is not None]
        self._add(record["step"], values)
        self.flush()  # a TensorBoard watching the run sees each line as it is logged

    def image(self, tag: str, step: int, pixels: np.ndarray) -> None:
        """Write uint8 ``pixels`` ``(H, W)`` grey or ``(H, W, 3)`` RGB at ``step``."""
        if self._writer is None:
            return
        pixels = np.asarray(pixels, dtype=np.uint8)
        png = io.BytesIO()
        Image.fromarray(pixels).save(png, format="PNG")
        image = summary_pb2.Summary.Image(height=pixels.shape[0], width=pixels.shape[1],
                                          colorspace=1 if pixels.ndim == 2 else 3, encoded_image_string=png.getvalue())
        self._add(step, [summary_pb2.Summary.Value(tag=tag, image=image)])

    def _add(self, step: int, values: list) -> None:
        self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)))

    def _write(self, event) -> None:
        self._writer.write(event.SerializeToString())

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()  # flushes and closes the file
            self._writer = None


def open_events(workdir: str, config) -> EventWriter | None:
    """The run's :class:`EventWriter` (``WORKDIR/tensorboard``), or None when ``train.tensorboard`` is off
    or tensorboard cannot be imported."""
    if not config.train.get("tensorboard", False) or RecordWriter is None:
        return None
    return EventWriter(os.path.join(workdir, EVENTS_DIR), int(config.diffusion.num_timesteps))
