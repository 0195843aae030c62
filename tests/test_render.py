"""Tests for remotefit/render.py (templates → generated/, HCL checks, atomic writes) and the pure parts of
remotefit/terraform.py and remotefit/proc.py that rendering and the Terraform wrapper rely on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import hcl2
import pytest

from remotefit.errors import UserError
from remotefit.proc import atomic_write, ensure_writable
from remotefit.render import (
    NODE_FILES,
    check_hcl,
    hcl_value,
    render_templates,
    render_terraform,
    template_context,
    terraformrc_text,
    write_hcl_file,
)
from remotefit.terraform import (
    MIN_VERSION,
    Terraform,
    TerraformError,
    failure,
    init_argv,
    parse_version,
    plan_argv,
    summarize,
    summarize_error,
)

ROOT = Path(__file__).resolve().parent.parent

GOOD_TF = 'variable "name" {\n  type    = string\n  default = "{{ terraform_required_version }}"\n}\n'


def plain(value):
    """python-hcl2 >= 8 keeps strings quoted ('"x"'), also as keys; older versions do not. Undo either."""
    if isinstance(value, str):
        return json.loads(value) if len(value) >= 2 and value[0] == value[-1] == '"' else value
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items() if k != "__is_block__"}
    return value


def make_templates(base: Path, **files: str) -> Path:
    tpl = base / "templates"
    tpl.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (tpl / name.replace("__", ".")).write_text(text)
    return tpl


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# -- the shipped templates ------------------------------------------------------------------
def test_shipped_templates_render_and_parse():
    rendered = render_templates(ROOT / "templates", template_context())
    assert {"main.tf", "variables.tf", "providers.tf", "versions.tf", "outputs.tf"} <= set(rendered)
    for name, text in rendered.items():
        assert "{{" not in text and "{%" not in text, name
        check_hcl(name, text)
    variables = plain(hcl2.loads(rendered["variables.tf"]))
    declared = {name for block in variables["variable"] for name in block}
    assert {"name", "region", "environment", "aws_endpoint"} <= declared


def test_render_terraform_writes_everything(tmp_path):
    out = tmp_path / "generated" / "terraform"
    written = render_terraform(ROOT / "templates", out)
    names = {p.name for p in written}
    assert {"main.tf", "versions.tf", *NODE_FILES} <= names
    assert all(p.is_file() for p in written)
    assert not list(out.glob(".*")), "no temporary files are left behind"


# -- errors name template, line and fix ----------------------------------------------------------
def test_undefined_variable_names_template_line_and_variable(tmp_path):
    tpl = make_templates(tmp_path, a__tf__j2='variable "x" {\n  default = "{{ no_such_value }}"\n}\n')
    with pytest.raises(UserError) as info:
        render_templates(tpl, template_context())
    msg = info.value.message
    assert msg.startswith("templates/a.tf.j2:2: 'no_such_value' is undefined")
    assert "template_context()" in msg and "\n" not in msg


def test_undefined_attribute_is_also_caught(tmp_path):
    tpl = make_templates(tmp_path, a__tf__j2="# ok\n# {{ aws_provider_constraint.nope.deeper }}\n")
    with pytest.raises(UserError) as info:
        render_templates(tpl, template_context())
    assert info.value.message.startswith("templates/a.tf.j2:2: ")
    assert "nope" in info.value.message


def test_jinja_syntax_error_names_template_and_line(tmp_path):
    tpl = make_templates(tmp_path, b__tf__j2="# one\n# two\n{% if x %}\n")
    with pytest.raises(UserError) as info:
        render_templates(tpl, template_context())
    assert info.value.message.startswith("templates/b.tf.j2:3: Jinja syntax error:")


def test_invalid_hcl_names_rendered_file_template_and_line(tmp_path):
    bad = GOOD_TF + 'resource "null_resource" "x" {\n  a = = 1\n}\n'
    tpl = make_templates(tmp_path, main__tf__j2=bad)
    with pytest.raises(UserError) as info:
        render_terraform(tpl, tmp_path / "out")
    msg = info.value.message
    assert msg.startswith("generated/terraform/main.tf (from templates/main.tf.j2):6: rendered HCL does not parse")
    assert "fix the template" in msg and "\n" not in msg


def test_check_hcl_unterminated_block():
    with pytest.raises(UserError) as info:
        check_hcl("x.tf", 'locals {\n  a = "b"\n')
    assert info.value.message.startswith("x.tf:") and "does not parse" in info.value.message


# -- atomicity -----------------------------------------------------------------------------------
def test_failing_template_leaves_previous_output_untouched(tmp_path):
    tpl = make_templates(tmp_path, main__tf__j2=GOOD_TF, other__tf__j2="locals {\n  a = 1\n}\n")
    out = tmp_path / "generated" / "terraform"
    render_terraform(tpl, out)
    before = snapshot(out)
    assert "main.tf" in before and "other.tf" in before

    # other.tf sorts after main.tf: a bad later template must not let the earlier one be rewritten.
    (tpl / "main.tf.j2").write_text(GOOD_TF + "# changed\n")
    (tpl / "other.tf.j2").write_text("locals {\n  a = {{ missing }}\n}\n")
    with pytest.raises(UserError):
        render_terraform(tpl, out)
    assert snapshot(out) == before

    (tpl / "other.tf.j2").write_text("locals {\n  a = = 1\n}\n")  # renders, but is not HCL
    with pytest.raises(UserError):
        render_terraform(tpl, out)
    assert snapshot(out) == before


def test_removed_template_does_not_linger(tmp_path):
    tpl = make_templates(tmp_path, main__tf__j2=GOOD_TF, old__tf__j2="locals {}\n")
    out = tmp_path / "out"
    render_terraform(tpl, out)
    (tpl / "old.tf.j2").unlink()
    render_terraform(tpl, out)
    assert not (out / "old.tf").exists() and (out / "main.tf").exists()


# -- HCL values, tfvars and CLI config --------------------------------------------------------------
@pytest.mark.parametrize(
    "value",
    [
        "plain",
        "with space",
        'quote " and \\ backslash',
        "${not_interpolated}",
        "%{ if x }",
        3,
        2.5,
        True,
        None,
        ["a", "b"],
        {"k": "v"},
    ],
)
def test_hcl_value_round_trips_through_python_hcl2(tmp_path, value):
    path = write_hcl_file(tmp_path / "x.tfvars", {"v": value}, "test")
    parsed = plain(hcl2.loads(path.read_text())["v"])
    if isinstance(value, str):
        # python-hcl2 returns strings with their template escapes kept ($${ stays $${).
        assert parsed.replace("$${", "${").replace("%%{", "%{") == value
    elif value is None:
        assert parsed in (None, "null", "${null}")
    else:
        assert parsed == value


def test_hcl_value_escapes_interpolation():
    assert hcl_value("${x}") == '"$${x}"'
    assert hcl_value("%{x}") == '"%%{x}"'


def test_write_hcl_file_is_atomic_and_commented(tmp_path):
    path = write_hcl_file(tmp_path / "sub" / "b.hcl", {"bucket": "b", "use_lockfile": True}, "header")
    text = path.read_text()
    assert text.startswith("# header\n") and "use_lockfile = true" in text
    assert os.listdir(path.parent) == ["b.hcl"]


def test_terraformrc_parses_and_points_at_mirror(tmp_path):
    parsed = plain(hcl2.loads(terraformrc_text(tmp_path / "mirror dir")))
    mirror = parsed["provider_installation"][0]["filesystem_mirror"][0]
    assert mirror["path"] == str(tmp_path / "mirror dir")


# -- generated/ not writable ----------------------------------------------------------------------
def test_ensure_writable_under_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError) as info:
        ensure_writable(tmp_path / "file" / "generated")
    assert "is a file" in info.value.message and str(tmp_path / "file" / "generated") in info.value.message


def test_ensure_writable_on_a_file(tmp_path):
    (tmp_path / "generated").write_text("")
    with pytest.raises(UserError):
        ensure_writable(tmp_path / "generated")


def test_atomic_write_under_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError):
        atomic_write(tmp_path / "file" / "terraform" / "main.tf", "x")


def test_render_terraform_under_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError):
        render_terraform(ROOT / "templates", tmp_path / "file" / "terraform")


# -- the Terraform wrapper ---------------------------------------------------------------------------
def fake_terraform(tmp_path: Path, version_json: str) -> Path:
    path = tmp_path / "bin" / "terraform"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\ncat <<'EOF'\n{version_json}\nEOF\n")
    path.chmod(0o755)
    return path


def test_terraform_too_old(tmp_path):
    fake = fake_terraform(tmp_path, '{"terraform_version":"1.9.0"}')
    with pytest.raises(UserError) as info:
        Terraform(str(fake), tmp_path, {}).version()
    assert info.value.message == (
        f"{fake} 1.9.0 is older than 1.11 (needed for S3 state locking with use_lockfile); "
        "upgrade Terraform, or set terraform_binary in invoke.yaml"
    )


def test_terraform_new_enough(tmp_path):
    fake = fake_terraform(tmp_path, '{"terraform_version":"1.11.0","platform":"linux_amd64"}')
    assert Terraform(str(fake), tmp_path, {}).version() == MIN_VERSION


def test_terraform_unreadable_version_is_one_line(tmp_path):
    fake = fake_terraform(tmp_path, "something odd\nand more")
    with pytest.raises(UserError) as info:
        Terraform(str(fake), tmp_path, {}).version()
    assert "cannot read its version" in info.value.message and "\n" not in info.value.message


def test_terraform_missing(tmp_path):
    with pytest.raises(UserError) as info:
        Terraform(str(tmp_path / "no-terraform"), tmp_path, {}).version()
    assert "not found on PATH" in info.value.message and "1.11" in info.value.message


def test_parse_version():
    assert parse_version("Terraform v1.11.4\non linux_amd64") == (1, 11, 4)
    assert parse_version("nothing") is None


def test_argv_builders():
    assert init_argv("terraform", None)[-1] == "-backend=false"
    assert "-backend-config=/g/backend.hcl" in init_argv("terraform", Path("/g/backend.hcl"))
    argv = plan_argv("terraform", Path("/g/a.tfvars"), detailed=True)
    assert "-lock-timeout=0s" in argv and "-var-file=/g/a.tfvars" in argv and "-detailed-exitcode" in argv


LOCKED = """\
Error: Error acquiring the state lock

Error message: operation error S3: PutObject, https response error
StatusCode: 412, RequestID:
b5YZ155uD3jX1knsZ4Z46HeT0JJFjOMefxL4SwaUhkCs2dor4eXx, HostID:
9Gjjt1m+cjU4OPvX9O9/8RuvnG41MRb/18Oux2o5H5MY7ISNTlXN+Dz9IG62/ILVxhAGI0qyPfg=,
api error PreconditionFailed: At least one of the pre-conditions you
specified did not hold
Lock Info:
  ID:        1d60c6a0-fd2f-49d9-f0ce-e7198c760d83
  Path:      remotefit-test-state/remotefit/test/terraform.tfstate
  Operation: OperationTypeApply
  Who:       root@vm
  Version:   1.11.4
  Created:   2026-11-26 07:36:22.53431186 +0000 UTC
  Info:
"""


def test_summarize_lock_error_names_the_lock_not_the_request():
    line = summarize_error(LOCKED)
    assert "lock 1d60c6a0-fd2f-49d9-f0ce-e7198c760d83" in line
    assert "held by root@vm since 2026-11-26 07:36:22" in line
    assert "force-unlock 1d60c6a0-fd2f-49d9-f0ce-e7198c760d83" in line
    assert "b5YZ" not in line


def test_summarize_lock_error_with_box_drawing():
    boxed = "\n".join(f"│ {ln}" for ln in LOCKED.splitlines())
    assert "lock 1d60c6a0-fd2f-49d9-f0ce-e7198c760d83," in summarize_error(boxed)


def test_summarize_other_errors():
    out = 'Error: Unsupported argument\n\n  on main.tf line 12, in resource "aws_instance" "node":\n'
    assert summarize_error(out) == "Unsupported argument (main.tf:12)"
    assert summarize_error("just\nthe last line\n") == "the last line"
    assert summarize_error("") == "no output"


@pytest.mark.parametrize(
    ("output", "kind"),
    [
        (LOCKED, "locked"),
        (
            "Error: creating EC2 Instance: operation error EC2: RunInstances, api error InsufficientInstanceCapacity: "
            "We currently do not have sufficient g5.xlarge capacity\n",
            "capacity",
        ),
        ("Error: api error VcpuLimitExceeded: You have requested more vCPU capacity\n", "quota"),
        ("Error: api error UnauthorizedOperation: You are not authorized to perform this operation\n", "other"),
        ("", "other"),
    ],
)
def test_summarize_says_the_kind_of_error(output: str, kind: str):
    assert summarize(output) == (summarize_error(output), kind)


def test_a_failed_run_is_a_terraform_error_with_its_kind_and_the_same_line():
    err = failure("terraform apply failed", LOCKED, "gen/tf", code=1, note=" (full output: gen/tf/last-apply.log)")
    assert isinstance(err, TerraformError) and err.kind == "locked" and err.code == 1
    assert err.message == (
        f"terraform apply failed: {summarize_error(LOCKED, 'gen/tf')} (full output: gen/tf/last-apply.log)"
    )


def test_terraform_and_its_provider_run_with_a_lazier_gc_unless_the_user_set_one(tmp_path, monkeypatch):
    """The AWS provider walks its schema in every walk of a command; GOGC reaches it through Terraform's environment."""
    from remotefit.proc import run
    from remotefit.terraform import PROVIDER_GOGC

    probe = tmp_path / "env-probe"
    probe.write_text('#!/bin/sh\necho "GOGC=$GOGC"\n')
    probe.chmod(0o755)
    monkeypatch.delenv("GOGC", raising=False)
    tf = Terraform(str(probe), tmp_path, {})
    assert run([str(probe)], env=tf.env, capture=True).stdout.strip() == f"GOGC={PROVIDER_GOGC}"
    monkeypatch.setenv("GOGC", "50")
    tf = Terraform(str(probe), tmp_path, {})
    assert run([str(probe)], env=tf.env, capture=True).stdout.strip() == "GOGC=50"


def test_unchanged_hcl_is_not_parsed_again(tmp_path, monkeypatch):
    # Every `inv` run re-renders generated/; what is already there passed the check when it was written.
    calls = []
    real = hcl2.loads
    monkeypatch.setattr(hcl2, "loads", lambda text: calls.append(text) or real(text))
    tpl = make_templates(tmp_path, main__tf__j2=GOOD_TF)
    out = tmp_path / "out"
    render_terraform(tpl, out)
    write_hcl_file(tmp_path / "x.tfvars", {"v": 1}, "test")
    assert len(calls) == 2
    render_terraform(tpl, out)
    write_hcl_file(tmp_path / "x.tfvars", {"v": 1}, "test")
    assert len(calls) == 2
    # A changed value, or a file changed by hand, is checked again.
    write_hcl_file(tmp_path / "x.tfvars", {"v": 2}, "test")
    (out / "main.tf").write_text("locals {}\n")
    render_terraform(tpl, out)
    assert len(calls) == 4
    (tpl / "main.tf.j2").write_text("locals {\n  a = = 1\n}\n")
    with pytest.raises(UserError, match="does not parse"):
        render_terraform(tpl, out)
