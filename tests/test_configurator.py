"""configurator.py: config files and --key=value flags applied left to right onto a dataclass."""

from __future__ import annotations  # annotations are strings: parse_config must resolve them

import dataclasses
import re
import sys
from pathlib import Path

import pytest

from configurator import parse_config
from runtime import ConfigError, exit_on_error


@dataclasses.dataclass
class Cfg:
    batch_size: int = 12  # sequences per step
    learning_rate: float = 6e-4
    dropout: float = 0.0
    dataset: str = "openwebtext"
    compile: bool = False
    n_kv_head: int | None = None  # None: same as n_head
    device: str | None = None
    seed: int = dataclasses.field(default=1337, metadata={"help": "random seed"})


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_survive_when_nothing_is_given():
    assert parse_config(Cfg(), []) == Cfg()


def test_flag_after_file_overrides_the_file(tmp_path):
    cfg_file = write(tmp_path, "x.py", "batch_size = 64\ndataset = 'shakespeare_char'\n")
    cfg = parse_config(Cfg(), [cfg_file, "--batch_size=32"])
    assert (cfg.batch_size, cfg.dataset) == (32, "shakespeare_char")


def test_file_after_flag_overrides_the_flag(tmp_path):
    cfg_file = write(tmp_path, "x.py", "batch_size = 64\n")
    assert parse_config(Cfg(), ["--batch_size=32", cfg_file]).batch_size == 64


def test_later_file_overrides_earlier_file(tmp_path):
    first = write(tmp_path, "a.py", "batch_size = 1\ndropout = 0.1\n")
    second = write(tmp_path, "b.py", "batch_size = 2\n")
    cfg = parse_config(Cfg(), [first, second])
    assert (cfg.batch_size, cfg.dropout) == (2, 0.1)


def test_parse_config_returns_a_new_instance():
    defaults = Cfg()
    cfg = parse_config(defaults, ["--batch_size=3"])
    assert cfg.batch_size == 3 and defaults.batch_size == 12


def test_int_is_accepted_for_float_and_converted():
    cfg = parse_config(Cfg(), ["--learning_rate=1"])
    assert cfg.learning_rate == 1.0 and type(cfg.learning_rate) is float


def test_flag_values_are_python_literals():
    cfg = parse_config(Cfg(), ["--dropout=0.1", "--learning_rate=3e-4", "--compile=True"])
    assert (cfg.dropout, cfg.learning_rate, cfg.compile) == (0.1, 3e-4, True)


def test_bare_flag_sets_a_bool_to_true():
    assert parse_config(Cfg(), ["--compile"]).compile is True


def test_bare_flag_for_a_non_bool_asks_for_a_value():
    with pytest.raises(ConfigError, match=r"--batch_size needs a value, e.g. --batch_size=12"):
        parse_config(Cfg(), ["--batch_size"])


def test_optional_field_accepts_a_value_and_none():
    assert parse_config(Cfg(), ["--n_kv_head=4"]).n_kv_head == 4
    assert parse_config(Cfg(), ["--n_kv_head=4", "--n_kv_head=None"]).n_kv_head is None
    assert parse_config(Cfg(), ["--device=cuda:0"]).device == "cuda:0"


def test_none_is_rejected_where_the_type_does_not_allow_it():
    with pytest.raises(ConfigError, match=r"'batch_size'.*expects int, got None \(NoneType\)"):
        parse_config(Cfg(), ["--batch_size=None"])


def test_non_literal_flag_value_falls_back_to_the_raw_string():
    assert parse_config(Cfg(), ["--dataset=shakespeare_char"]).dataset == "shakespeare_char"
    assert parse_config(Cfg(), ["--dataset=data/my set"]).dataset == "data/my set"


def test_str_field_keeps_a_numeric_looking_flag_as_a_string():
    assert parse_config(Cfg(), ["--dataset=42"]).dataset == "42"


def test_unknown_flag_key_names_the_flag_and_suggests_the_closest_key():
    with pytest.raises(ConfigError) as err:
        parse_config(Cfg(), ["--learing_rate=3e-4"])
    assert str(err.value) == (
        "unknown config key 'learing_rate' (from --learing_rate=3e-4); did you mean 'learning_rate'?"
    )


def test_unknown_file_key_names_the_file_and_suggests_the_closest_key(tmp_path):
    cfg_file = write(tmp_path, "x.py", "batchsize = 8\n")
    with pytest.raises(ConfigError) as err:
        parse_config(Cfg(), [cfg_file])
    assert str(err.value) == f"unknown config key 'batchsize' (from {cfg_file}); did you mean 'batch_size'?"


def test_unknown_key_with_no_close_match_points_to_help():
    with pytest.raises(ConfigError, match=r"unknown config key 'zzz'.*--help"):
        parse_config(Cfg(), ["--zzz=1"])


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--batch_size=abc", "'batch_size' (from --batch_size=abc) expects int, got 'abc' (str)"),
        ("--batch_size=True", "'batch_size' (from --batch_size=True) expects int, got True (bool)"),
        ("--batch_size=1.5", "'batch_size' (from --batch_size=1.5) expects int, got 1.5 (float)"),
        ("--dropout=False", "'dropout' (from --dropout=False) expects float, got False (bool)"),
    ],
)
def test_wrong_type_names_key_expected_type_and_value_seen(flag, message):
    with pytest.raises(ConfigError) as err:
        parse_config(Cfg(), [flag])
    assert str(err.value) == f"config key {message}"


def test_wrong_type_in_a_file_names_the_file(tmp_path):
    cfg_file = write(tmp_path, "x.py", "batch_size = '8'\n")
    with pytest.raises(ConfigError, match=r"'batch_size' \(from .*x\.py\) expects int, got '8' \(str\)"):
        parse_config(Cfg(), [cfg_file])


def test_config_file_may_import_modules_define_helpers_and_use_private_names(tmp_path):
    cfg_file = write(
        tmp_path,
        "x.py",
        "import math\n"
        "from math import sqrt\n"
        "def _half(x):\n    return x / 2\n"
        "def double(x):\n    return 2 * x\n"
        "class Helper:\n    pass\n"
        "_tokens = 2 ** 10\n"
        "batch_size = int(math.sqrt(_tokens))\n"
        "learning_rate = _half(1e-3)\n",
    )
    cfg = parse_config(Cfg(), [cfg_file])
    assert (cfg.batch_size, cfg.learning_rate) == (32, 5e-4)


def test_config_file_runs_in_a_fresh_namespace(tmp_path):
    # configurator.py imports sys; a config exec'd into its globals would see it
    cfg_file = write(tmp_path, "x.py", "batch_size = sys.maxsize\n")
    with pytest.raises(ConfigError, match="x.py', line 1: NameError: name 'sys'"):
        parse_config(Cfg(), [cfg_file])


def test_missing_config_file_error_names_the_path(tmp_path):
    missing = str(tmp_path / "nope.py")
    with pytest.raises(ConfigError, match=re.escape(f"cannot read config file '{missing}'")):
        parse_config(Cfg(), [missing])


def test_help_lists_every_key_with_type_and_default_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(Cfg(), ["--batch_size=3", "--help"], prog="train.py", description="Train a GPT.")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: train.py" in out and "Train a GPT." in out and "left to right" in out
    for f in dataclasses.fields(Cfg):
        assert f"--{f.name}={getattr(Cfg(), f.name)!r}" in out
    assert "int | None" in out and "str | None" in out
    assert "sequences per step" in out  # inline comment on the field
    assert "random seed" in out  # field metadata help


def test_short_help_flag_also_prints_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(Cfg(), ["-h"])
    assert exit_info.value.code == 0
    assert "--batch_size=12" in capsys.readouterr().out


def test_a_cli_prints_a_config_error_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        exit_on_error(lambda: parse_config(Cfg(), ["--learing_rate=3e-4"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'learing_rate'") and "Traceback" not in err


def test_parse_config_reads_sys_argv_by_default(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "--batch_size=7"])
    assert parse_config(Cfg()).batch_size == 7


def test_a_config_file_with_an_error_names_the_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match=r"bad\.py', line 2: SyntaxError"):
        parse_config(Cfg(), [write(tmp_path, "bad.py", "batch_size = 4\nlearning_rate = = 1\n")])
    with pytest.raises(ConfigError, match=r"div\.py', line 3: ZeroDivisionError"):
        parse_config(Cfg(), [write(tmp_path, "div.py", "import math\n\nbatch_size = 1 // 0\n")])


def test_a_json_config_file_sets_its_keys(tmp_path):
    assert parse_config(Cfg(), [write(tmp_path, "run.json", '{"batch_size": 3}')]).batch_size == 3
    with pytest.raises(ConfigError, match="JSON object"):
        parse_config(Cfg(), [write(tmp_path, "list.json", "[1, 2]")])
