"""Per-method options: registered dataclasses, generated flags, flat config keys, validation."""

from dataclasses import dataclass

import pytest

from fusegpt import options as opt
from fusegpt.cli import build_parser, config_from_args
from fusegpt.compare import compress_command
from fusegpt.config import CompressConfig, ConfigError
from fusegpt.methods import method_info, method_names


def test_every_option_has_a_generated_flag_that_reaches_the_config():
    parser = build_parser()
    specs = list(opt.option_specs())
    assert {s.group for s in specs} >= {"laco", "heal", "global"}
    argv = ["compress", "m", "--out", "o"]
    for s in specs:
        if s.type is bool:
            argv.append(s.flag)
        elif s.allowed():
            argv += [s.flag, next(c for c in s.allowed() if c != s.default)]
        else:
            v = s.default + 1 if s.maximum is None or s.default + 1 <= s.maximum else s.default - 0.5
            argv += [s.flag, str(v)]
    cfg = config_from_args(parser.parse_args(argv))
    for s in specs:
        got = getattr(cfg.method_options(s.group), s.name)
        assert got != s.default, s.flag


def test_methods_name_the_group_they_read():
    groups = opt.option_groups()
    for m in method_names():
        g = method_info(m).options
        assert g is None or g in groups
    assert method_info("laco").options == "laco" and method_info("heal-lora").options == "heal"


def test_flat_and_nested_keys_and_defaults():
    cfg = CompressConfig.from_dict({"laco_layers": 2, "heal_from": "shortgpt", "global-receivers": 3})
    assert cfg.options == {"laco": {"layers": 2}, "heal": {"base": "shortgpt"}, "global": {"receivers": 3}}
    assert cfg.method_options("laco").layers == 2 and cfg.method_options("laco").interval == 2
    again = CompressConfig.from_dict(cfg.to_dict())
    assert again.options == cfg.options
    assert CompressConfig().method_options("laco").threshold == 0.65
    assert isinstance(CompressConfig.from_dict({"laco_threshold": 1}).method_options("laco").threshold, float)


@pytest.mark.parametrize("data,msg", [
    ({"laco_layers": 1}, "--laco-layers must be >= 2"),
    ({"laco_threshold": 2.0}, "--laco-threshold must be <= 1"),
    ({"laco_layers": "4"}, "--laco-layers takes a int"),
    ({"heal_from": "heal-lora"}, "--heal-from must be one of"),
    ({"options": {"nope": {}}}, "unknown method options 'nope'"),
    ({"options": {"laco": {"width": 3}}}, "unknown option 'width' of 'laco'"),
])
def test_bad_options_are_refused_naming_the_flag(data, msg):
    with pytest.raises(ConfigError, match=msg):
        CompressConfig.from_dict(data).validate()


def test_a_new_group_gets_its_flags_without_touching_config_or_cli():
    @dataclass
    class Toy:
        width: int = opt.option(3, "toy: a width", minimum=1)
        fast: bool = opt.option(False, "toy: go fast")

    opt.register_options("toy", Toy)
    try:
        args = build_parser().parse_args(["compress", "m", "--out", "o", "--toy-width", "5", "--toy-fast"])
        cfg = config_from_args(args)
        assert cfg.method_options("toy") == Toy(width=5, fast=True)
        with pytest.raises(ConfigError, match="--toy-width must be >= 1"):
            CompressConfig.from_dict({"toy_width": 0}).validate()
    finally:
        opt._GROUPS.pop("toy")


def test_compare_rows_name_their_option_flags():
    cfg = CompressConfig.from_preset("cpu", method="laco", laco_layers=2, fold_norms=True)
    cmd = compress_command("m", cfg)
    assert "--laco-layers 2" in cmd and "--fold-norms" in cmd and "--laco-interval" not in cmd
