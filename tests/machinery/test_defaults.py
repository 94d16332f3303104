"""One truth for every default: the README's preset table is the configs' own, and one cache variable."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

import ddpm_jax
from ddpm_jax.utils import cache
from ddpm_jax.configs import PRESETS, get_config, preset_table

ROOT = Path(__file__).resolve().parents[2]


def test_the_readmes_preset_table_is_the_one_the_configs_generate():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- preset-table: begin -->\n(.*?)\n<!-- preset-table: end -->", readme, re.S)
    assert block, "README.md lost its preset-table markers"
    assert block.group(1) == preset_table(), (
        "README.md's preset table differs from the configs: paste the output of "
        "python -c 'from ddpm_jax.configs import preset_table; print(preset_table())'")


def test_the_preset_table_reads_each_value_from_its_config():
    rows = {line.split("|")[1].strip(" `"): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in preset_table().splitlines()[2:]}
    assert list(rows) == list(PRESETS)
    for preset, cells in rows.items():
        c = get_config(preset)
        assert cells[4] == f"{c.train.batch_size:,}" and cells[5] == f"{c.train.num_steps:,}"
        assert cells[7] == (f"{c.model.num_classes}, w = {c.sampling.guidance_scale:g}" if c.model.num_classes else "none")
    assert rows["seed"][0].endswith("block head") and rows["seed"][1] == "12,552,848"  # the report's count


def test_one_cache_variable_everywhere():
    old = re.compile(r"DDPM_JAX_CACHE(?!_DIR)\b")
    files = [*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md"), *(ROOT / "ddpm_jax").rglob("*.py"),
             *(ROOT / "experiments").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    mentions = [f"{p.relative_to(ROOT)}:{n}" for p in files for n, line in enumerate(p.read_text().splitlines(), 1)
                if old.search(line) and p.name not in ("cache.py", "CHANGELOG.md")]  # those two name the old one on purpose
    assert not mentions, mentions


def test_the_cache_folder_follows_the_variable_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir({}) == tmp_path / "home" / ".cache" / "ddpm_jax"
    assert cache.cache_dir({"XDG_CACHE_HOME": str(tmp_path / "xdg")}) == tmp_path / "xdg" / "ddpm_jax"
    assert cache.cache_dir({"XDG_CACHE_HOME": "x", "DDPM_JAX_CACHE_DIR": str(tmp_path / "c")}) == tmp_path / "c"
    with pytest.warns(UserWarning, match="set \\$DDPM_JAX_CACHE_DIR=/old"):
        assert cache.cache_dir({"DDPM_JAX_CACHE": "/old"}) == tmp_path / "home" / ".cache" / "ddpm_jax"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.cache_dir({"DDPM_JAX_CACHE": "/old", "DDPM_JAX_CACHE_DIR": "/new"})


def test_the_version_and_license_are_said_once_and_agree():
    citation = (ROOT / "CITATION.cff").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^version: "([^"]+)"$', citation, re.M).group(1) == ddpm_jax.__version__
    assert 'dynamic = ["version"]' in pyproject and 'attr = "ddpm_jax.__version__"' in pyproject
    assert re.search(r"^license: (\S+)$", citation, re.M).group(1) == "Apache-2.0"
    assert 'license = { text = "Apache-2.0" }' in pyproject
    assert (ROOT / "LICENSE").read_text().split()[:4] == ["Apache", "License", "Version", "2.0,"]
    # Each reimplemented paper once in the README's references, each with its arXiv address in CITATION.cff.
    references = (ROOT / "README.md").read_text().split("## References", 1)[1].split("\n## ", 1)[0]
    for arxiv in re.findall(r"https://arxiv.org/abs/(\d{4}\.\d{5})", citation):
        assert references.count(f"arxiv.org/abs/{arxiv}") == 1, arxiv
