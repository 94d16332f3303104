"""Generated bad inputs (hypothesis): command-line flags, ``--set`` fields and values, and damaged checkpoints.

Each property is what docs/reliability.md promises a hostile user: an exit status in the documented set, never a
traceback, an ``error:`` line naming the field or file, nothing in an existing workdir lost or changed, and
never a checkpoint loaded with weights other than the ones it was saved with. IDX headers are fuzzed in
tests/machinery/test_idx_headers.py. Example counts are bounded so the suite stays within CI's budget; hypothesis
keeps its database of failing examples under .hypothesis/ so a failure found once is tried first next time.
"""

import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import ddpm_jax
from ddpm_jax.training import checkpoint as ckpt_lib
from ddpm_jax import configs as configs_lib
from ddpm_jax.training import train as train_lib
from ddpm_jax.configs import get_config
from ddpm_jax.training.setup import create_train_state
from ddpm_jax.cli import train as mnist

# Every example calls main() in-process; a few trace the network. Bounded so the file runs in about a minute;
# DDPM_JAX_FUZZ_EXAMPLES=1000 searches harder (the counts scale with it).
SCALE = int(os.environ.get("DDPM_JAX_FUZZ_EXAMPLES", "60")) / 60
FUZZ = settings(max_examples=max(1, round(60 * SCALE)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


@pytest.fixture
def trained(trained_tiny_run):
    return trained_tiny_run


class _Accepted(Exception):
    """Raised by the stand-in for training: the CLI accepted the input and handed over this config."""

    def __init__(self, config, images):
        self.config, self.images = config, images


@pytest.fixture
def accepted(monkeypatch):
    """Replace training by a check that what the CLI accepts could run: the config validates (as training's
    first act) and the network, the jitted step and the probe trace abstractly (shapes only, no compute)."""
    def check(config, workdir, images=None, labels=None, **_):
        # What training does before it starts, in its order: a ValueError here is main()'s to report.
        train_lib._training_labels(labels, len(images), int(config.model.get("num_classes", 0)))
        if config.data.max_train_examples:
            images = images[: config.data.max_train_examples]
        configs_lib.validate_config(config, num_examples=len(images))
        raise _Accepted(config, images)

    monkeypatch.setattr(train_lib, "train_and_evaluate", check)


def _run(argv, capsys):
    """main()'s exit status and stderr; argparse's own refusals (SystemExit 2) count as exit 2."""
    try:
        code = mnist.main(argv)
    except SystemExit as e:
        code = e.code
    except _Accepted as e:
        _traces(e.config, e.images)
        code = 0
    return code, capsys.readouterr().err


def _traces(config, images):
    schedule = configs_lib.schedule_from_config(config)
    state = jax.eval_shape(lambda: create_train_state(config))
    labels = np.zeros(len(images), np.int32) if config.model.num_classes else None
    for fn in (train_lib.make_dataset_train_step(schedule, train_lib.Batching.from_config(config)),
               train_lib.make_dataset_probe(schedule, train_lib.Batching.from_config(config))):
        jax.eval_shape(fn, state, images, labels)


def _config_fields(preset="tiny"):
    config = get_config(preset).to_dict()
    fields = []
    for section, body in config.items():
        if isinstance(body, dict):
            fields += [f"{section}.{k}" for k in body]
        else:
            fields.append(section)
    return sorted(fields)


VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.integers(min_value=-3, max_value=70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),  # 'nan' and 'inf' arrive as strings
    st.sampled_from(["1e999", "-1e999", "True", "False", "None", "()", "(1, 'a', 2)", "(0,)", "(1, 2, 2)", "(7,)",
                     "''", "[1, 2]", "{}", "0.0", "-0.0", "1e-300", "2**64", "float('nan')"]),
    st.text(max_size=12),
)


@FUZZ
@given(field=st.sampled_from(_config_fields()), value=VALUES)
def test_any_set_value_is_refused_naming_the_field_or_accepted_and_runnable(field, value, trained, idx_dir, accepted,
                                                                           capsys, snapshot):
    before = snapshot(trained)
    code, err = _run(["--preset", "tiny", "--idx-dir", str(idx_dir), "--workdir", str(trained), "--no-progress",
                      "--set", f"{field}={value}"], capsys)
    assert code in (0, 2), (code, err)
    event(f"exit {code}")  # pytest --hypothesis-show-statistics: how many were accepted and trained (abstractly)
    assert "Traceback" not in err
    if code == 2:
        assert err.startswith("error: ") and err.count("\n") == 1 and field.split(".")[-1] in err, err
    assert snapshot(trained) == before


NUMBERS = st.one_of(
    st.integers(min_value=-(2**66), max_value=2**66).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "-1", "1", "nan", "inf", "-inf", "1e999", "", "abc", "0x10", "3.5"]),
)
FLAGS = st.sampled_from(["--steps", "--epochs", "--batch-size", "--lr", "--seed", "--stop-at", "--time-limit"])
FIELD_OF = {"--steps": "train.num_steps", "--epochs": "--epochs", "--batch-size": "train.batch_size",
            "--lr": "train.learning_rate", "--seed": "seed", "--stop-at": "--stop-at", "--time-limit": "--time-limit"}


@FUZZ
@given(flags=st.lists(st.tuples(FLAGS, NUMBERS), min_size=1, max_size=3, unique_by=lambda f: f[0]))
@example(flags=[("--epochs", "4.49423283715579e+306")])  # finite, but epochs x images overflowed to inf steps
def test_any_numeric_flag_is_refused_with_an_error_line_or_accepted_and_runnable(flags, trained, idx_dir, accepted,
                                                                                capsys, snapshot):
    before = snapshot(trained)
    argv = ["--preset", "tiny", "--idx-dir", str(idx_dir), "--workdir", str(trained), "--no-progress"]
    for flag, value in flags:
        argv.append(f"{flag}={value}")
    code, err = _run(argv, capsys)
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err
    if code == 2:
        # One line of ours, or argparse's usage plus its one error line (for a value that is not a number).
        line = [x for x in err.splitlines() if "error:" in x]
        assert len(line) == 1 and any(FIELD_OF[f] in line[0] or f in line[0] for f, _ in flags), err
    assert snapshot(trained) == before


def _corrupt(path: Path, kind: str, where: float, data: bytes):
    content = path.read_bytes()
    at = int(where * max(len(content) - 1, 0))
    if kind == "flip":
        if not content:
            return False
        b = bytearray(content)
        b[at] ^= 1 << (len(data) % 8)
        path.write_bytes(bytes(b))
    elif kind == "truncate":
        path.write_bytes(content[:at])
    elif kind == "append":
        path.write_bytes(content + (data or b"\0"))
    elif kind == "overwrite":
        path.write_bytes((data * (len(content) // max(len(data), 1) + 1))[:len(content)] if data else b"")
    elif kind == "delete":
        path.unlink()
    return True


@pytest.fixture(scope="module")
def pristine(trained_tiny_run):
    """The existing run's two checkpoints as loaded before any damage: what a load must return."""
    return {step: ddpm_jax.load_checkpoint(str(trained_tiny_run), step=step) for step in (2, 4)}


@settings(max_examples=max(1, round(20 * SCALE)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.floats(min_value=0, max_value=1, exclude_max=True),
       kind=st.sampled_from(["flip", "truncate", "append", "overwrite", "delete"]),
       where=st.floats(min_value=0, max_value=1), data=st.binary(min_size=0, max_size=64))
def test_a_corrupted_checkpoint_never_loads_with_other_weights(which, kind, where, data, trained, pristine,
                                                               tmp_path_factory, capsys, snapshot):
    run = tmp_path_factory.mktemp("corrupt") / "run"
    shutil.copytree(trained, run)
    step_dir = run / "checkpoints" / "4"
    files = sorted(p for p in step_dir.rglob("*") if p.is_file())
    target = files[int(which * len(files))]
    _corrupt(target, kind, where, data)
    before = snapshot(run)
    loaded = ddpm_jax.load_checkpoint(str(run))  # never raises: step 2 is intact
    assert "Traceback" not in capsys.readouterr().err
    reference = pristine[loaded.step]
    # Either the damage was found (step 2 instead), or it touched nothing the weights come from.
    assert loaded.step in (2, 4)
    for a, b in zip(jax.tree.leaves((loaded.params, loaded.ema_params, loaded.batch_stats)),
                    jax.tree.leaves((reference.params, reference.ema_params, reference.batch_stats))):
        np.testing.assert_array_equal(a, b)
    if loaded.step == 4:
        assert loaded.identity == reference.identity
    else:
        with pytest.raises(ckpt_lib.CheckpointDamagedError):
            ddpm_jax.load_checkpoint(str(run), step=4)
    assert snapshot(run) == before
    shutil.rmtree(run.parent)
