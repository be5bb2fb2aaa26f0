"""Settings: defaults, the TOML file, DOWNPOUR_* variables and flags, and their errors."""

import argparse

import pytest

from downpour import cli
from downpour.common import config
from downpour.common.config import Config, resolve
from downpour.common.errors import ConfigError


def parse(argv, environ=None):
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, ("run", "data", "model", "optim", "train", "output"))
    return resolve(parser.parse_args(argv), environ={} if environ is None else environ)


def test_defaults_are_valid():
    cfg = parse([])
    assert cfg == Config()
    assert cfg.hidden == (256, 128) and cfg.optimizer == "adam" and cfg.threads == 1


def test_precedence_file_then_environment_then_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('lr = 0.5\nbatch-size = 32\nhidden = [64, 32]\nbatchnorm = true\nepochs = 7\n')
    env = {"DOWNPOUR_LR": "0.25", "DOWNPOUR_EPOCHS": "9"}
    cfg = parse(["--config", str(toml), "--lr", "0.125"], env)
    assert cfg.lr == 0.125                    # flag beats environment beats file
    assert cfg.epochs == 9                    # environment beats file
    assert cfg.batch_size == 32 and cfg.hidden == (64, 32) and cfg.batchnorm is True
    assert parse([], {"DOWNPOUR_CONFIG": str(toml)}).lr == 0.5


def test_flags_of_every_type():
    cfg = parse(["--hidden", "512,256,128", "--no-batchnorm", "--dropout", "0.5", "--seed", "3",
                 "--activation", "tanh", "--lr-schedule", "exp:gamma=0.99"])
    assert cfg.hidden == (512, 256, 128) and cfg.dropout == 0.5 and cfg.seed == 3
    assert parse(["--batchnorm"]).batchnorm is True
    assert parse(["--hidden", ""]).hidden == ()   # no hidden layer: logistic regression


@pytest.mark.parametrize("argv,message", [
    (["--lr", "-0.1"], "lr must be >= 0.0, got -0.1"),
    (["--lr", "nan"], "lr must be a finite number"),
    (["--hidden", "256,abc"], "hidden='256,abc': expected comma-separated positive integers"),
    (["--hidden", "256,0"], "every width must be a positive integer"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
    (["--epochs", "2.5"], "epochs='2.5': expected an integer"),
    (["--activation", "swish"], "activation must be one of relu"),
    (["--progress", "loud"], "progress must be one of"),
])
def test_bad_flags_name_the_setting(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(argv)


@pytest.mark.parametrize("toml, message", [
    ("batchsize = 32\n", "unknown setting 'batchsize'.*did you mean 'batch_size'"),
    ("learning_rate = 0.1\n", r"unknown setting 'learning_rate'.*; did you mean 'lr'\?$"),
    (None, "does not exist"),
    ("lr = [", "not valid TOML"),
    ("batchnorm = 3\n", "batchnorm=3: expected true or false"),
])
def test_bad_config_files(tmp_path, toml, message):
    path = tmp_path / "bad.toml"
    if toml is not None:
        path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        parse(["--config", str(path)])


def test_unknown_environment_variable():
    with pytest.raises(ConfigError, match="unknown setting 'DOWNPOUR_LRR' in the environment"):
        parse([], {"DOWNPOUR_LRR": "0.1"})


def test_optimizer_args():
    cfg = parse(["--optimizer-args", "momentum=0.95, eps=1e-7,betas=0.8:0.9", "--weight-decay", "0.01"])
    assert cfg.optimizer_kwargs() == {"weight_decay": 0.01, "momentum": 0.95, "eps": 1e-7,
                                      "betas": (0.8, 0.9)}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse(["--optimizer-args", "momentum"]).optimizer_kwargs()
    with pytest.raises(ConfigError, match="is not a number"):
        parse(["--optimizer-args", "momentum=high"]).optimizer_kwargs()


@pytest.mark.parametrize("heartbeat_s,dead_after_s,ok", [
    (0.5, 5.0, True),               # the defaults
    (0.5, 1.5, True),               # exactly three beats
    (0.1, 0.3, True),               # 3 x 0.1 is 0.30000000000000004 in floating point
    (0.5, 1.49, False),
    (0.5, 0.1, False),              # below one beat: every node would die at its first
    (2.0, 5.0, False),              # a longer beat needs a longer wait
])
def test_dead_after_s_must_outlast_three_heartbeats(heartbeat_s, dead_after_s, ok):
    if ok:
        assert Config(heartbeat_s=heartbeat_s, dead_after_s=dead_after_s).dead_after_s == dead_after_s
        return
    shortest = f"{config.LIVENESS_BEATS * heartbeat_s:g}"
    with pytest.raises(ConfigError, match=rf"dead_after_s={dead_after_s:g} is too short for "
                       rf"heartbeat_s={heartbeat_s:g}.*give --dead-after-s {shortest} or more"):
        Config(heartbeat_s=heartbeat_s, dead_after_s=dead_after_s)


def test_every_alias_names_a_setting_and_is_none_itself():
    for alias, name in config.ALIASES.items():
        assert name in config.FIELDS and alias not in config.FIELDS, alias


@pytest.mark.parametrize("key,suggested", [
    ("learning_rate", "lr"), ("batch", "batch_size"), ("num_workers", "workers"),
    ("num_epochs", "epochs"), ("num_servers", "shards"), ("eps", "optimizer_args"),
    ("mini_batch", "batch_size"),   # difflib alone says micro_batches, another thing
    ("batchsize", "batch_size"),    # no alias: the nearest spelling
])
def test_aliases_and_near_spellings_are_suggested_from_every_source(tmp_path, key, suggested):
    toml = tmp_path / "run.toml"
    toml.write_text(f"{key} = 1\n")
    with pytest.raises(ConfigError, match=rf"unknown setting '{key}' in config file .*; "
                                          rf"did you mean '{suggested}'\?"):
        parse(["--config", str(toml)])
    variable = "DOWNPOUR_" + key.upper()
    with pytest.raises(ConfigError, match=rf"unknown setting '{variable}' in the environment; "
                                          rf"did you mean 'DOWNPOUR_{suggested.upper()}'\?"):
        parse([], {variable: "1"})
    with pytest.raises(ConfigError, match=rf"'{key}' in the cluster spec; did you mean '{suggested}'\?"):
        config.from_dict({key: 1})


def test_an_unknown_setting_with_no_near_name_gets_a_short_pointer_to_help(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("zqxv = 1\n")
    for source in (lambda: parse(["--config", str(toml)]), lambda: parse([], {"DOWNPOUR_ZQXV": "1"})):
        with pytest.raises(ConfigError) as e:
            source()
        assert str(e.value).endswith("; `downpour train --help` lists every setting")
        assert "epochs" not in str(e.value)       # no list of every setting


@pytest.mark.parametrize("argv,hint", [
    (["train", "--learning-rate", "0.1"], "did you mean --lr?"),
    (["train", "--num-servers=2"], "did you mean --shards?"),
    (["train", "--wokers", "2"], "did you mean --workers?"),      # no alias: the nearest flag
    (["worker", "--learning-rate", "0.1"], "see --help"),         # a worker takes no --lr
])
def test_an_unknown_flag_suggests_its_alias_where_the_command_has_it(capsys, argv, hint):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"unrecognized argument {argv[1].split('=')[0]}; {hint}" in err
