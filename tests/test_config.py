"""The configuration: defaults < config file < environment < flags; the file checked key by key;
``fastinfer config --print`` as TOML that reads back to the same configuration."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fastinfer import config as config_module
from fastinfer.config import Config, ConfigError, config_file_path, config_toml, read_config_file

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_precedence_defaults_file_environment_flags(tmp_path):
    path = write(
        tmp_path / "config.toml",
        'http_port = 1001\nmanagement_port = 1002\nbinary_port = 1003\ndevices = "cpu:2"\n'
        'models = ["a=echo:float32:16"]\n',
    )
    environ = {"FASTINFER_MANAGEMENT_PORT": "2002", "FASTINFER_BINARY_PORT": "2003"}
    config = Config.load({"binary_port": 3003, "http_port": None}, path, environ)
    assert config.http_port == 1001  # file over default (a flag left out is None)
    assert config.management_port == 2002  # environment over file
    assert config.binary_port == 3003  # flag over environment
    assert config.devices == "cpu:2"
    assert config.models == ("a=echo:float32:16",)
    assert config.request_timeout_s == Config().request_timeout_s  # untouched: default


def test_file_values_are_typed(tmp_path):
    path = write(tmp_path / "config.toml", 'request_timeout_s = 5\nbatch_max_delay_s = 0.25\nlog_level = "debug"\n')
    values = read_config_file(path)
    assert values == {"request_timeout_s": 5.0, "batch_max_delay_s": 0.25, "log_level": "debug"}
    assert isinstance(values["request_timeout_s"], float)


def test_unknown_key_is_an_error_naming_it(tmp_path):
    path = write(tmp_path / "config.toml", "http_port = 1\nhttp_prot = 2\n")
    with pytest.raises(ConfigError, match="'http_prot'"):
        Config.load(config_file=path, environ={})


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('http_port = "8080"', "http_port"),
        ("http_port = 8080.5", "http_port"),
        ("http_port = true", "http_port"),
        ('models = "a=b"', "models"),
        ("models = [1]", "models"),
        ('shutdown_timeout_s = "10"', "shutdown_timeout_s"),
        ("devices = 2", "devices"),
        ("[host]\nname = 1", "host"),
    ],
)
def test_wrong_type_is_an_error_naming_the_key(tmp_path, line, key):
    path = write(tmp_path / "config.toml", line + "\n")
    with pytest.raises(ConfigError, match=rf"\b{key} must be"):
        read_config_file(path)


def test_bad_toml_and_missing_file_are_errors_naming_the_file(tmp_path):
    bad = write(tmp_path / "bad.toml", "http_port = = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml is not valid TOML"):
        read_config_file(bad)
    with pytest.raises(ConfigError, match=r"cannot read config file .*missing\.toml"):
        Config.load(config_file=str(tmp_path / "missing.toml"), environ={})


def test_file_values_are_validated_like_flags(tmp_path):
    path = write(tmp_path / "config.toml", 'models = ["nopath"]\n')
    with pytest.raises(ConfigError, match="NAME=PATH"):
        Config.load(config_file=path, environ={})


def test_which_file_is_read(tmp_path, monkeypatch):
    default = write(tmp_path / "default.toml", "")
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", default)
    assert config_file_path("/flag.toml", {"FASTINFER_CONFIG": "/env.toml"}) == "/flag.toml"
    assert config_file_path(None, {"FASTINFER_CONFIG": "/env.toml"}) == "/env.toml"
    assert config_file_path(None, {}) == default  # present: read
    assert config_file_path("", {"FASTINFER_CONFIG": "/env.toml"}) is None  # '' means none
    os.remove(default)
    assert config_file_path(None, {}) is None  # the default path is optional


def test_printed_config_reads_back_the_same(tmp_path):
    config = Config(
        models=("a=echo:float32:16", 'quoted "b"=/models/b\\c.onnx'),
        http_port=1,
        batch_max_delay_s=0.002,
        cache_dir="/var/cache/fastinfer",
    )
    text = config_toml(config)
    for f in dataclasses.fields(Config):
        assert f"\n{f.name} = " in text  # every option, uncommented
        assert f"# {f.metadata['help']} (default: " in text
    path = write(tmp_path / "printed.toml", text)
    assert Config.load(config_file=path, environ={}) == config


def test_printed_config_hides_tokens():
    text = config_toml(Config(inference_token="s3cret", management_token=""))
    assert "s3cret" not in text
    assert "# inference_token is set, not shown" in text
    assert 'management_token = ""' in text


def run_cli(*args: str, environ: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTINFER_")}
    return subprocess.run(
        [sys.executable, "-m", "fastinfer", "config", *args],
        env={**env, **(environ or {})},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_config_print_shows_the_effective_config(tmp_path):
    path = write(tmp_path / "config.toml", "http_port = 1001\nmanagement_port = 1002\n")
    result = run_cli(
        "--print", "--config", path, "--management-port", "3002", environ={"FASTINFER_BINARY_PORT": "2003"}
    )
    assert result.returncode == 0, result.stderr
    values = tomllib.loads(result.stdout)
    assert (values["http_port"], values["management_port"], values["binary_port"]) == (1001, 3002, 2003)
    assert set(values) == {f.name for f in dataclasses.fields(Config)}


def test_config_print_refuses_a_bad_file(tmp_path):
    path = write(tmp_path / "config.toml", "no_such_option = 1\n")
    result = run_cli("--print", "--config", path)
    assert result.returncode == 2
    assert "'no_such_option'" in result.stderr
    result = run_cli("--print", environ={"FASTINFER_CONFIG": path})  # the variable names a file too
    assert result.returncode == 2


def test_checked_in_template_is_the_generated_one():
    result = run_cli("--print", "--template", "--config", "")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (REPO / "scripts/config.toml").read_text(), (
        "regenerate it: fastinfer config --print --template > scripts/config.toml"
    )
    assert result.stdout == config_toml(Config(), template=True)


@pytest.mark.parametrize("key", ["batch_max_size", "gpu_batch_max_size", "batch_max_runs"])
def test_batch_limits_are_at_least_one(key):
    with pytest.raises(ConfigError, match=f"{key}.* must be at least 1"):
        Config(**{key: 0}).validate()


def test_a_model_limit_overrides_the_server_wide_one_for_that_model_only(tmp_path):
    path = write(tmp_path / "c.toml", 'model_limits = ["resnet:batch_max_size=2", "resnet:queue_max_delay_s=0.5"]\n')
    config = Config.load(config_file=path, environ={"FASTINFER_QUEUE_MAX_SIZE": "64"})
    resnet, other = config.limits_for("resnet"), config.limits_for("other")
    assert (resnet.batch_max_size, resnet.queue_max_delay_s, resnet.queue_max_size) == (2, 0.5, 64)
    assert (other.batch_max_size, other.queue_max_delay_s) == (config.batch_max_size, config.queue_max_delay_s)
    assert config.model_batch_limits() == {"resnet": 2}, "the workers lay resnet's batches out as the batcher does"
    from_environment = Config.from_sources(environ={"FASTINFER_MODEL_LIMITS": "a:batch_max_size=3 b:queue_max_size=9"})
    assert (from_environment.limits_for("a").batch_max_size, from_environment.limits_for("b").queue_max_size) == (3, 9)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("resnet", "expects NAME:KEY=VALUE"),
        (":batch_max_size=2", "expects NAME:KEY=VALUE"),
        ("resnet:batch_size=2", "'batch_size' is not one of batch_max_size"),
        ("resnet:batch_max_size=two", "'two' is not a valid int"),
        ("resnet:batch_max_size=0", "batch_max_size must be at least 1"),
        ("resnet:queue_max_delay_s=0", "queue_max_delay_s must be a finite number above 0"),
        ("resnet:queue_max_delay_s=inf", "queue_max_delay_s must be a finite number above 0"),
        ("resnet:batch_max_delay_s=nan", "batch_max_delay_s must be a finite number, 0 or more"),
    ],
)
def test_a_malformed_model_limit_is_an_error_naming_it(spec, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_sources({"model_limits": [spec]}, environ={})


def test_switches_from_every_source(tmp_path):
    """A bool field (allow_client_shm) reads from TOML booleans, words in the environment, and
    --x / --no-x flags; anything else is an error naming it."""
    import argparse

    from fastinfer.cli import _add_config_flags

    assert Config.from_sources(environ={}).allow_client_shm is False
    assert Config.from_sources(environ={"FASTINFER_ALLOW_CLIENT_SHM": "yes"}).allow_client_shm is True
    assert Config.from_sources(environ={"FASTINFER_ALLOW_CLIENT_SHM": "0"}).allow_client_shm is False
    with pytest.raises(ConfigError, match="FASTINFER_ALLOW_CLIENT_SHM='maybe'"):
        Config.from_sources(environ={"FASTINFER_ALLOW_CLIENT_SHM": "maybe"})
    assert read_config_file(write(tmp_path / "a.toml", "allow_client_shm = true\n")) == {"allow_client_shm": True}
    with pytest.raises(ConfigError, match="allow_client_shm must be true or false"):
        read_config_file(write(tmp_path / "b.toml", 'allow_client_shm = "yes"\n'))
    parser = argparse.ArgumentParser()
    _add_config_flags(parser)
    assert parser.parse_args(["--allow-client-shm"]).allow_client_shm is True
    assert parser.parse_args(["--no-allow-client-shm"]).allow_client_shm is False
    assert parser.parse_args([]).allow_client_shm is None  # not given: the other sources decide
