"""A config as the JSON saved beside every checkpoint, and back (frozen), so a checkpoint loads without it."""

from __future__ import annotations

import json

import ml_collections


def config_to_json(config: ml_collections.ConfigDict) -> str:
    """The config's fields as JSON, keys sorted; returns the text :func:`config_from_dict` reads back (parsed)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def config_from_dict(d: dict) -> ml_collections.ConfigDict:
    """Rebuild a config saved with :func:`config_to_json`, frozen against edits."""
    return ml_collections.FrozenConfigDict(d)
