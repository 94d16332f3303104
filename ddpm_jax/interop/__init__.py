"""Weights in and out of other libraries' formats (docs/interop.md).

* :mod:`~ddpm_jax.interop.diffusers`: Ho et al.'s U-Net (``model.name='ddpm_unet'``) as diffusers' ``UNet2DModel``
  and the schedule as its ``DDPMScheduler``, both ways (state dicts and configs, numpy and JSON alone);
* :mod:`~ddpm_jax.interop.report_unet`: the report's U-Net as one safetensors file a PyTorch module loads;
* :mod:`~ddpm_jax.interop.workdir`: a run workdir (the checkpoint training writes) made from imported weights.

Nothing here needs torch or diffusers; only loading the results elsewhere does.
"""

from __future__ import annotations

from ddpm_jax.interop.diffusers import (
    read_pipeline,
    run_config_from_diffusers,
    scheduler_config,
    unet_config,
    unet_params,
    unet_state_dict,
    write_pipeline,
)
from ddpm_jax.interop.report_unet import write_report_unet
from ddpm_jax.interop.workdir import write_run

__all__ = [
    "read_pipeline", "run_config_from_diffusers", "scheduler_config", "unet_config", "unet_params",
    "unet_state_dict", "write_pipeline", "write_report_unet", "write_run",
]
