"""Config: validation, and every flag's environment-variable twin."""

from __future__ import annotations

import dataclasses

import pytest

from server.cli import build_parser
from server.config import ServerConfig, config_from_args, env_name


def test_every_field_has_a_flag_and_an_env_twin(monkeypatch):
    monkeypatch.setenv("DELTASERVE_PORT", "6000")
    monkeypatch.setenv("DELTASERVE_WARMUP", "false")
    monkeypatch.setenv("DELTASERVE_GRACE_PERIOD", "2.5")
    config = config_from_args(build_parser().parse_args(["serve", "--max-batch-size", "8"]))
    assert (config.port, config.warmup, config.grace_period, config.max_batch_size) == (6000, False, 2.5, 8)
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for f in dataclasses.fields(ServerConfig):
        assert "--" + f.name.replace("_", "-") in help_text
        assert env_name(f.name) in help_text


@pytest.mark.parametrize("bad", [{"port": 70000}, {"max_batch_size": 0}, {"device": "tpu"},
                                 {"kv_cache_tokens": 4, "block_size": 16}, {"grace_period": -1}])
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        ServerConfig(**bad)


def test_the_device_slot_count_has_one_flag_and_a_deprecated_alias(monkeypatch, caplog):
    assert ServerConfig().device_adapters == 64
    assert ServerConfig(max_device_adapters=8).device_adapters == 8
    with caplog.at_level("WARNING", logger="deltaserve.config"):
        assert ServerConfig(max_adapter_slots=4).device_adapters == 4
    assert "deprecated" in caplog.text
    assert ServerConfig(max_adapter_slots=4, max_device_adapters=4).device_adapters == 4
    with pytest.raises(ValueError, match="deprecated alias"):
        ServerConfig(max_adapter_slots=4, max_device_adapters=8)
    monkeypatch.setenv("DELTASERVE_PREFIX_CACHING", "false")
    assert config_from_args(build_parser().parse_args(["serve"])).prefix_caching is False
