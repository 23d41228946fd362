"""Config booleans are true or false only, and a folder given as the config file says so."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from connector import config as config_module
from connector.config import load_config
from connector.errors import ConfigError
from tests.unit.test_config_load import GOOD, write


def _models() -> list[type[BaseModel]]:
    return [
        v
        for v in vars(config_module).values()
        if isinstance(v, type)
        and issubclass(v, BaseModel)
        and v.__module__ == config_module.__name__
    ]


def test_every_boolean_of_the_config_model_is_strict() -> None:
    booleans = [
        (model.__name__, name, field)
        for model in _models()
        for name, field in model.model_fields.items()
        if field.annotation is bool
    ]
    assert len(booleans) >= 4  # enable_cbt, use_fips_endpoint, quiescent, json
    for model, name, field in booleans:
        assert any(getattr(m, "strict", False) for m in field.metadata), f"{model}.{name}"


@pytest.mark.parametrize("value", ['"yes"', '"true"', "1", '"on"', "0"])
def test_a_boolean_that_is_not_true_or_false_is_refused(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, GOOD.replace("[vcenter]\n", f"[vcenter]\nenable_cbt = {value}\n"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "vcenter.enable_cbt: must be true or false" in str(info.value)


def test_true_and_false_are_accepted(tmp_path: Path) -> None:
    for value in (True, False):
        text = GOOD.replace("[vcenter]\n", f"[vcenter]\nenable_cbt = {str(value).lower()}\n")
        assert load_config(write(tmp_path, text)).require_vcenter().enable_cbt is value


def test_a_folder_is_reported_as_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a folder, not a file; pass the path of the TOML"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
