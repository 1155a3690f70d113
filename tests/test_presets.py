"""Model presets as files (``avatar-train --config starter|paper|FILE.toml``)."""

from __future__ import annotations

import argparse
import json

import pytest

from avatar_stream import STARTER_DIR
from avatar_stream.training import cli
from avatar_stream.training.config import ModelConfig


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cli._model_args(p)
    return p.parse_args(list(argv))


def test_the_starter_preset_is_the_shipped_starter_config():
    shipped = json.loads((STARTER_DIR / "starter.json").read_text())["config"]
    assert cli.model_config(_args("--config", "starter")) == ModelConfig.from_dict(shipped)
    assert cli.model_config(_args("--config", "paper")) == ModelConfig()
    assert {"starter", "paper"} <= set(cli.preset_names())


def test_command_line_overrides_the_preset(tmp_path):
    cfg = cli.model_config(_args("--config", "starter", "--width", "0.5", "--set", "w_mouth=0"))
    assert (cfg.width, cfg.w_mouth, cfg.f_id) == (0.5, 0, 128)
    own = tmp_path / "mine.toml"
    own.write_text("[model]\nfusion = \"tcn\"\ntcsan_levels = 2\n")
    cfg = cli.model_config(_args("--tiny", "--config", str(own)))
    assert (cfg.fusion, cfg.tcsan_levels, cfg.width) == ("tcn", 2, ModelConfig.tiny().width)


@pytest.mark.parametrize(("text", "match"), [
    (None, "no such preset; use one of .*paper.*starter"),
    ("[model\n", "not valid TOML"),
    ("[train]\nlr = 1\n", r"expected one \[model\] table"),
    ("[model]\nno_such_field = 1\n", "unknown keys"),
])
def test_bad_presets_are_one_line(tmp_path, text, match):
    arg = "nonesuch"
    if text is not None:
        arg = str(tmp_path / "bad.toml")
        (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        cli.model_config(_args("--config", arg))
    assert "\n" not in str(e.value).strip()
