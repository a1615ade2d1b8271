"""One definition per setting: every command-line default is its config's default (walking the parsers)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
from pydantic import BaseModel

from dadpo.cli import build_parser
from dadpo.evaluate.config import EvalConfig, GenerationSettings, JudgeConfig
from dadpo.generation import GenerationConfig
from dadpo.prune.config import PruneConfig
from dadpo.recover.config import DSFTConfig, KDConfig, LoraConfig, RecoverConfig, SamplingConfig
from dadpo.settings import default_text

#: command → (config, flag-dest prefix, {dest: field} where the name differs) for every config it fills
SOURCES = {
    "prune": [(PruneConfig, "", {})],
    "recover": [(RecoverConfig, "", {}), (KDConfig, "kd_", {}), (LoraConfig, "lora_", {}), (DSFTConfig, "dsft_", {}),
                (SamplingConfig, "", {"gen_batch_size": "batch_size"})],
    "evaluate": [(EvalConfig, "", {"ppl": "ppl_corpora"}), (JudgeConfig, "judge_", {}), (GenerationSettings, "", {})],
    "generate": [(GenerationConfig, "", {})],
}


def _default(config, field: str):
    if dataclasses.is_dataclass(config):
        return {f.name: f.default for f in dataclasses.fields(config)}.get(field, dataclasses.MISSING)
    info = config.model_fields.get(field)
    return dataclasses.MISSING if info is None else info.get_default(call_default_factory=True)


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("command", list(SOURCES))
def test_every_flag_default_is_its_config_default(command):
    checked = 0
    for action in _commands()[command]._actions:
        for config, prefix, renames in SOURCES[command]:
            field = renames.get(action.dest) or action.dest.removeprefix(prefix)
            if not action.dest.startswith(prefix) or (default := _default(config, field)) is dataclasses.MISSING:
                continue
            if isinstance(default, BaseModel):  # a whole section (--judge local:SPEC): its fields are checked
                continue
            if isinstance(default, list) and isinstance(action.default, str):  # a comma-separated flag
                default = ",".join(map(str, default))
            if action.dest == "lora":  # a switch for a section that is None (no LoRA) by default
                assert default is None and action.default is False
            elif action.default is None and default is not None:  # left to the config (a --config file may
                # set it): the help states the config's default
                assert f"(default {default_text(config, field)})" in " ".join(action.help.split()), (
                    command, action.dest, action.help)
            else:
                assert action.default == default, (command, action.dest, action.default, default)
            checked += 1
            break
    assert checked >= {"prune": 15, "recover": 35, "evaluate": 20, "generate": 6}[command]


def test_the_walk_catches_a_hand_written_default(monkeypatch):
    """A flag whose default is typed by hand and differs from its config's fails the walk."""
    real = _commands

    def with_a_stale_flag():
        commands = real()
        next(a for a in commands["recover"]._actions if a.dest == "beta2").default = 0.2
        return commands

    monkeypatch.setattr(__import__(__name__), "_commands", with_a_stale_flag)
    with pytest.raises(AssertionError, match="beta2"):
        test_every_flag_default_is_its_config_default("recover")


def test_decoding_settings_are_declared_once():
    """`dadpo generate`, recover's pair sampling and evaluation answers share DecodingConfig's fields —
    the same types, constraints and help — and differ only in their defaults."""
    from pydantic import ValidationError

    from dadpo.decoding import DecodingConfig

    for config in (GenerationConfig, SamplingConfig, GenerationSettings):
        assert issubclass(config, DecodingConfig)
        for name, base in DecodingConfig.model_fields.items():
            field = config.model_fields[name]
            assert (field.annotation, field.metadata, field.description) == (
                base.annotation, base.metadata, base.description), (config, name)
        for bad in ({"top_p": 0}, {"temperature": -0.5}, {"max_new_tokens": 0}, {"precision": "fp8"}):
            with pytest.raises(ValidationError, match=next(iter(bad))):
                config(**bad)
    assert [c().temperature for c in (GenerationConfig, SamplingConfig, GenerationSettings)] == [0.0, 0.7, 1.0]
    assert GenerationConfig.of(SamplingConfig(), seed=3) == GenerationConfig(
        max_new_tokens=192, temperature=0.7, top_p=0.95, seed=3)


def test_one_error_formatter_names_the_key_in_a_recipe_and_the_flag_on_a_command_line(capsys, tmp_path):
    """Recipes and every command report a bad setting through `dadpo.settings`: one line naming the YAML path
    (with the closest valid key for a typo) or the flag."""
    from dadpo.cli import main
    from dadpo.errors import DadpoError
    from dadpo.recipe import validate_recipe

    base = {"name": "r", "output_dir": "/tmp/x", "student": "s", "recover": {}}
    cases = [({"recover": {"sampling": {"top_p": 2}}}, "recipe: recover.sampling.top_p: Input should be less than "
              "or equal to 1 (got 2)"),
             ({"recover": {"betta2": 0.1}}, "recipe: recover.betta2: unknown key; did you mean recover.beta2?"),
             ({"recover": {"beta1": -1, "lr": 0}}, "(and 1 more)")]
    for change, message in cases:
        with pytest.raises(DadpoError) as e:
            validate_recipe({**base, **change})
        assert message in str(e.value)
    config_file = tmp_path / "eval.yaml"
    config_file.write_text("sets: [vicuna_bench]\ngeneration: {top_p: 2}\n")  # a file's key is named as written
    for argv, flag in ((["recover", "--student", "s", "--teacher", "t", "--prompts", "p", "--out", "/tmp/x",
                         "--top-p", "2"], "--top-p:"),
                       (["prune", "--model", "m", "--out", "/tmp/x", "--ratio", "0"], "--ratio:"),
                       # evaluate names the config path (its settings may come from a --config file as well)
                       (["evaluate", "--students", "s", "--teacher", "t", "--out", "/tmp/x", "--top-p", "2"],
                        "generation.top_p:"),
                       (["evaluate", "--students", "s", "--teacher", "t", "--out", "/tmp/x", "--config",
                         str(config_file)], "generation.top_p:")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert flag in err and len(err.strip().splitlines()) == 1, err
