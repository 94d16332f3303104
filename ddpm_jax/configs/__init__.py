"""Experiment configs as data, and what a config builds.

One ``ml_collections.ConfigDict`` per preset. Everything that knows the config's fields is in this
package, one concern a module:

* :mod:`~ddpm_jax.configs.default`: every field, its default and what it means;
* :mod:`~ddpm_jax.configs.presets`: one module per preset (:data:`PRESETS`), each overriding only what
  differs from the default (or from the preset it extends), and :func:`get_config`;
* :mod:`~ddpm_jax.configs.checks`: the one check of every field (:func:`validate_config`);
* :mod:`~ddpm_jax.configs.builders`: what a config builds, once: the network (:func:`build_model`), the
  schedule (:func:`schedule_from_config`), the timesteps a sampler visits;
* :mod:`~ddpm_jax.configs.describe`: a config in one line (:class:`Config`'s repr, :func:`summary`);
* :mod:`~ddpm_jax.configs.serialization`: the JSON saved beside every checkpoint;
* :mod:`~ddpm_jax.configs.classifier`: the feature classifier's config.

The train state a config describes (its optimizer and initialized network) is built one layer up, by
:func:`ddpm_jax.training.setup.create_train_state`. Training reads the config only through these
builders and in its entry point (:func:`ddpm_jax.training.train.train_and_evaluate`); the step and sampler
factories, the training loop and the checkpoints are handed objects (and the checkpoints a plain dict to
store), not the config. A new field is added in three places: its default in ``default.py``, its check in
``checks.py``, and where it is built.

``get_config(preset)`` returns a fresh, mutable config; command-line flags override fields of it
(``--set model.base_channels=16``), and the config used is saved as JSON beside every checkpoint, so a
checkpoint loads without it being repeated.
"""

from __future__ import annotations

from ddpm_jax.configs.builders import (
    build_model,
    expected_variables,
    figure_grid_size,
    model_input_shape,
    num_training_images,
    output_multiple,
    sampling_timesteps,
    schedule_from_config,
    variable_shapes,
)
from ddpm_jax.configs.checks import (
    BATCHNORM_MODES,
    LOSS_WEIGHTINGS,
    LR_SCHEDULES,
    MAX_SEED,
    MAX_STEPS,
    MAX_TIMESTEPS,
    NONFINITE_POLICIES,
    READ_ONLY_WHEN,
    UNCONDITIONAL_MODES,
    available_memory_bytes,
    check_field_read,
    check_fields_read,
    is_int,
    is_number,
    require,
    validate_config,
)
from ddpm_jax.configs.classifier import get_classifier_config
from ddpm_jax.configs.describe import Config, network_shape, parameter_count, summary
from ddpm_jax.configs.presets import PRESETS, get_config, preset_table
from ddpm_jax.configs.serialization import config_from_dict, config_to_json

__all__ = [
    "BATCHNORM_MODES", "Config", "LOSS_WEIGHTINGS", "LR_SCHEDULES", "MAX_SEED", "MAX_STEPS", "MAX_TIMESTEPS",
    "NONFINITE_POLICIES", "PRESETS", "READ_ONLY_WHEN", "UNCONDITIONAL_MODES", "available_memory_bytes",
    "build_model", "check_field_read", "check_fields_read", "config_from_dict", "config_to_json",
    "expected_variables", "figure_grid_size", "get_classifier_config", "get_config", "is_int", "is_number",
    "model_input_shape", "network_shape", "num_training_images", "output_multiple", "parameter_count",
    "preset_table", "require", "sampling_timesteps", "schedule_from_config", "summary", "validate_config",
    "variable_shapes",
]
