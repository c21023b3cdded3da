"""The catalog file: what a person writes in atelier.toml, and the errors they get for mistakes."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from atelier.config import Config, load_config


def test_no_file_gives_the_builtin_models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ATELIER_CONFIG", raising=False)
    config = load_config()
    assert {"tiny-sd", "tiny-sdxl", "noop"} <= set(config.models)
    # A Unix socket in the home's private run folder unless told otherwise: other local users cannot reach it.
    assert config.broker.router == f"ipc://{config.home / 'run' / 'router'}"
    assert config.broker.pub == f"ipc://{config.home / 'run' / 'pub'}"


def test_a_catalog_entry_overrides_its_family_limits(tmp_path):
    path = tmp_path / "atelier.toml"
    path.write_text('default_model = "mine"\n[models.mine]\nfamily = "sdxl"\nsource = "/m/sdxl"\n'
                    "max_width = 1536\ndefault_steps = 20\n")
    config = load_config(path)
    limits = config.models["mine"].limits
    assert (limits.max_width, limits.max_height, limits.default_steps) == (1536, 2048, 20)
    assert list(config.models) == ["mine"]  # a catalog of one's own: no built-ins unless asked for


@pytest.mark.parametrize("text, words", [
    ('[models.x]\nfamily = "dalle"\nsource = "/m"\n', "unknown family 'dalle'"),
    ('[models.x]\nfamily = "sd1"\nsource = "/m"\ncolour = "red"\n', "colour"),
    ('default_model = "missing"\n', "default_model 'missing' is not in the catalog"),
    ('[broker]\nheartbeat_s = 0\n', "heartbeat_s"),
    ('[models.x]\nfamily = "sd1"\nsource = "/m"\nloras = { "ink wash" = "/l.safetensors" }\n', "loras.ink wash"),
    ('[models.x]\nfamily = "sd1"\nsource = "/m"\ncontrolnets = { "a/b c" = "/c" }\n', "controlnets.a/b c"),
])
def test_mistakes_are_named(tmp_path, text, words):
    path = tmp_path / "atelier.toml"
    path.write_text(text)
    with pytest.raises(ValidationError) as caught:
        load_config(path)
    assert words in str(caught.value)


def test_builtins_can_be_turned_off():
    config = Config.model_validate({"builtin_models": False, "default_model": "a",
                                    "models": {"a": {"family": "sd1", "source": "/m/a"}}})
    assert list(config.models) == ["a"]
