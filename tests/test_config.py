"""Tests for remotefit/config.py: aws_env_vars parsing, validation messages, env overrides, defaults, paths.

Every bad input must become one UserError naming the file (and line) or the environment variable, the
key, and the fix. These are cheap unit tests; tests/test_tasks.py checks a few of them through `inv`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from remotefit.config import (
    ENV_FILE_ENV,
    GENERATED_ENV,
    Defaults,
    Paths,
    Settings,
    aws_regions,
    bucket_name_problem,
    load_defaults,
    load_settings,
    parse_env_file,
)
from remotefit.errors import UserError

GOOD = {
    "AWS_ACCOUNT": "testacct",
    "AWS_REGION": "us-east-1",
    "STAGE": "test",
    "TF_STATE_BUCKET": "remotefit-test-state",
    "TARGET": "sandbox",
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """No setting may leak in from the developer's shell: the environment overrides the file."""
    for key in [*Settings.model_fields, ENV_FILE_ENV, GENERATED_ENV, "AWS_CONFIG_FILE"]:
        monkeypatch.delenv(key, raising=False)


def write_env(tmp_path: Path, monkeypatch, text: str | None = None, **changes: str | None) -> Path:
    """Write an aws_env_vars (GOOD with `changes`; None drops a key) and point REMOTEFIT_ENV_FILE at it."""
    path = tmp_path / "aws_env_vars"
    if text is None:
        values = {**GOOD, **changes}
        text = "".join(f"{k}={v}\n" for k, v in values.items() if v is not None)
    path.write_text(text)
    monkeypatch.setenv(ENV_FILE_ENV, str(path))
    return path


def load_error(tmp_path: Path) -> str:
    with pytest.raises(UserError) as info:
        load_settings(tmp_path)
    msg = info.value.message
    assert "\n" not in msg, "a UserError is one line"
    return msg


# -- the happy path ------------------------------------------------------------------------
def test_good_file_loads(tmp_path, monkeypatch):
    write_env(tmp_path, monkeypatch)
    s = load_settings(tmp_path)
    assert (s.AWS_ACCOUNT, s.AWS_REGION, s.STAGE, s.TF_STATE_BUCKET) == (
        "testacct",
        "us-east-1",
        "test",
        "remotefit-test-state",
    )
    assert s.is_sandbox and s.AWS_PROFILE is None


def test_shipped_aws_env_vars_is_valid(monkeypatch):
    root = Path(__file__).resolve().parent.parent
    s = load_settings(root)
    assert s.TARGET == "sandbox"


def test_comments_export_quotes_and_trailing_comments(tmp_path, monkeypatch):
    text = (
        "# a comment\n"
        "\n"
        "export AWS_ACCOUNT=testacct\n"
        "AWS_REGION = eu-west-1   # trailing comment\n"
        "STAGE='dev'\n"
        'TF_STATE_BUCKET="remotefit-x-state"  # quoted, then a comment\n'
        "AWS_PROFILE='team profile'\n"
    )
    path = write_env(tmp_path, monkeypatch, text)
    parsed = parse_env_file(path)
    assert parsed["AWS_ACCOUNT"] == ("testacct", 3)
    assert parsed["AWS_REGION"] == ("eu-west-1", 4)
    s = load_settings(tmp_path)
    assert (s.AWS_REGION, s.STAGE, s.TF_STATE_BUCKET, s.AWS_PROFILE) == (
        "eu-west-1",
        "dev",
        "remotefit-x-state",
        "team profile",
    )
    assert "export AWS_PROFILE='team profile'" in s.env_lines()


# -- bad files -----------------------------------------------------------------------------
def test_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_FILE_ENV, str(tmp_path / "nope" / "aws_env_vars"))
    msg = load_error(tmp_path)
    assert "aws_env_vars" in msg and "not found" in msg and ENV_FILE_ENV in msg


def test_missing_file_without_override_names_the_repo_file(tmp_path):
    msg = load_error(tmp_path)
    assert msg.startswith("aws_env_vars: file not found") and str(tmp_path) in msg


def test_malformed_line_names_file_and_line(tmp_path, monkeypatch):
    write_env(tmp_path, monkeypatch, "AWS_ACCOUNT=x\n# ok\nthis is not a setting\n")
    msg = load_error(tmp_path)
    assert msg.startswith("aws_env_vars:3: malformed line 'this is not a setting'")
    assert "KEY=VALUE" in msg


def test_unclosed_quote(tmp_path, monkeypatch):
    write_env(tmp_path, monkeypatch, "AWS_ACCOUNT='testacct\n")
    msg = load_error(tmp_path)
    assert msg.startswith("aws_env_vars:1: AWS_ACCOUNT has an unclosed quote")


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [
        ("AWS_REGON", "AWS_REGION"),
        ("TF_STATE_BUKET", "TF_STATE_BUCKET"),
        ("STAGES", "STAGE"),
        ("AWS_PROFLE", "AWS_PROFILE"),
    ],
)
def test_unknown_key_suggests_closest(tmp_path, monkeypatch, typo, suggestion):
    write_env(tmp_path, monkeypatch, f"AWS_ACCOUNT=a\n{typo}=x\n")
    msg = load_error(tmp_path)
    assert msg == f"aws_env_vars:2: unknown key {typo}; did you mean {suggestion}?"


def test_unknown_key_without_close_match_lists_known_keys(tmp_path, monkeypatch):
    write_env(tmp_path, monkeypatch, "ZZZ=1\n")
    msg = load_error(tmp_path)
    assert "unknown key ZZZ" in msg and "AWS_REGION" in msg and "TF_STATE_BUCKET" in msg


def test_missing_key(tmp_path, monkeypatch):
    write_env(tmp_path, monkeypatch, STAGE=None)
    msg = load_error(tmp_path)
    assert msg == "aws_env_vars: STAGE is missing; add a line STAGE=... to aws_env_vars"


def test_empty_account(tmp_path, monkeypatch):
    write_env(tmp_path, monkeypatch, AWS_ACCOUNT="")
    msg = load_error(tmp_path)
    assert msg.startswith("aws_env_vars:1: AWS_ACCOUNT=''") and "must not be empty" in msg


def test_account_not_usable_as_file_name(tmp_path, monkeypatch):
    write_env(tmp_path, monkeypatch, AWS_ACCOUNT="my/team")
    assert "usable in a file name" in load_error(tmp_path)


@pytest.mark.parametrize(
    ("region", "hint"), [("us-east-9", "did you mean us-east-"), ("eu-wset-1", "did you mean eu-west-1?")]
)
def test_invalid_region_suggests(tmp_path, monkeypatch, region, hint):
    write_env(tmp_path, monkeypatch, AWS_REGION=region)
    msg = load_error(tmp_path)
    assert msg.startswith(f"aws_env_vars:2: AWS_REGION='{region}' is not an AWS region")
    assert hint in msg


def test_bad_stage(tmp_path, monkeypatch):
    write_env(tmp_path, monkeypatch, STAGE="Dev_1")
    msg = load_error(tmp_path)
    assert msg.startswith("aws_env_vars:3: STAGE='Dev_1'") and "lowercase" in msg


def test_target_must_be_aws_or_sandbox(tmp_path, monkeypatch):
    write_env(tmp_path, monkeypatch, TARGET="gcp")
    assert load_error(tmp_path) == "aws_env_vars:5: TARGET='gcp' must be aws or sandbox"


def test_regions_known_even_with_a_bad_profile(monkeypatch):
    """A misspelled AWS_PROFILE must not crash region validation (botocore sessions read the profile)."""
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    aws_regions.cache_clear()
    try:
        assert {"us-east-1", "eu-west-1", "ap-southeast-2"} <= aws_regions()
    finally:
        aws_regions.cache_clear()


# -- environment overrides --------------------------------------------------------------------
def test_environment_wins_over_file(tmp_path, monkeypatch):
    write_env(tmp_path, monkeypatch)
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    monkeypatch.setenv("TARGET", "aws")
    s = load_settings(tmp_path)
    assert s.AWS_REGION == "eu-central-1" and s.TARGET == "aws" and s.STAGE == "test"


def test_environment_supplies_a_missing_key(tmp_path, monkeypatch):
    write_env(tmp_path, monkeypatch, STAGE=None)
    monkeypatch.setenv("STAGE", "prod")
    assert load_settings(tmp_path).STAGE == "prod"


def test_error_from_environment_names_the_variable(tmp_path, monkeypatch):
    write_env(tmp_path, monkeypatch)  # the file itself is fine
    monkeypatch.setenv("AWS_REGION", "us-east-9")
    msg = load_error(tmp_path)
    assert msg.startswith("environment variable AWS_REGION='us-east-9' is not an AWS region")


def test_bucket_error_from_environment_names_the_variable(tmp_path, monkeypatch):
    write_env(tmp_path, monkeypatch)
    monkeypatch.setenv("TF_STATE_BUCKET", "Bad_Bucket")
    msg = load_error(tmp_path)
    assert msg.startswith("environment variable TF_STATE_BUCKET='Bad_Bucket' is not a valid S3 bucket name")


# -- S3 bucket names ---------------------------------------------------------------------------
BAD_BUCKETS = [
    ("ab", "3 to 63 characters"),
    ("a" * 64, "3 to 63 characters"),
    ("Remotefit-state", "lowercase letters, digits, dots and hyphens"),
    ("remotefit_state", "lowercase letters, digits, dots and hyphens"),
    ("remotefit state", "lowercase letters, digits, dots and hyphens"),
    ("-remotefit", "start and end"),
    ("remotefit-", "start and end"),
    (".remotefit", "start and end"),
    ("remotefit..state", "two adjacent dots"),
    ("192.168.5.4", "IP address"),
    ("xn--remotefit", "start with 'xn--'"),
    ("sthree-remotefit", "start with 'sthree-'"),
    ("amzn-s3-demo-remotefit", "start with 'amzn-s3-demo-'"),
    ("remotefit-s3alias", "end with '-s3alias'"),
    ("remotefit--ol-s3", "end with '--ol-s3'"),
    ("remotefit.mrap", "end with '.mrap'"),
    ("remotefit--x-s3", "end with '--x-s3'"),
    ("remotefit--table-s3", "end with '--table-s3'"),
]


@pytest.mark.parametrize(("name", "why"), BAD_BUCKETS)
def test_bucket_name_rules(name, why):
    problem = bucket_name_problem(name)
    assert problem is not None and why in problem


@pytest.mark.parametrize("name", ["abc", "a" * 63, "remotefit-test-state", "my.bucket-1", "1.2.3", "s3alias-first"])
def test_valid_bucket_names(name):
    assert bucket_name_problem(name) is None


@pytest.mark.parametrize(("name", "why"), [BAD_BUCKETS[2], BAD_BUCKETS[10], BAD_BUCKETS[14]])
def test_bad_bucket_in_file_names_line_and_rule(tmp_path, monkeypatch, name, why):
    write_env(tmp_path, monkeypatch, TF_STATE_BUCKET=name)
    msg = load_error(tmp_path)
    assert msg.startswith(f"aws_env_vars:4: TF_STATE_BUCKET='{name}' is not a valid S3 bucket name: it ")
    assert why in msg


# -- invoke.yaml defaults ------------------------------------------------------------------------
def test_defaults_accept_the_shipped_invoke_yaml():
    d = load_defaults({"terraform_mirror": "/opt/tf-plugins"})
    assert isinstance(d, Defaults) and d.terraform_binary == "terraform" and d.terraform_mirror == "/opt/tf-plugins"


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [("terraform_binry", "terraform_binary"), ("gpu_instance", "gpu_instance_type"), ("idle_minute", "idle_minutes")],
)
def test_defaults_typo_suggests(typo, suggestion):
    with pytest.raises(UserError) as info:
        load_defaults({typo: "x"})
    assert info.value.message == f"invoke.yaml: remotefit.{typo} is not a known setting; did you mean {suggestion}?"


def test_defaults_bad_value_names_key():
    with pytest.raises(UserError) as info:
        load_defaults({"max_nodes": 0})
    assert info.value.message.startswith("invoke.yaml: remotefit.max_nodes=0")


# -- paths ---------------------------------------------------------------------------------------
def test_paths_default_under_root(tmp_path):
    p = Paths.at(tmp_path)
    assert p.generated == tmp_path.resolve() / "generated"
    assert p.terraform_dir == p.generated / "terraform"
    assert p.backend_file.name == "backend.hcl"


def test_paths_generated_override(tmp_path, monkeypatch):
    monkeypatch.setenv(GENERATED_ENV, str(tmp_path / "elsewhere"))
    assert Paths.at(tmp_path).generated == (tmp_path / "elsewhere").resolve()


def test_generated_under_a_file_is_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv(GENERATED_ENV, str(tmp_path / "file" / "generated"))
    with pytest.raises(UserError) as info:
        Paths.at(tmp_path)
    msg = info.value.message
    assert msg.startswith(f"{GENERATED_ENV}: cannot use {tmp_path / 'file' / 'generated'} as a folder")
    assert f"{tmp_path / 'file'} is a file" in msg
