"""Templates → generated/: Terraform files, tfvars, the backend config and the CLI config.

Jinja runs with StrictUndefined and only shapes the HCL; values reach Terraform through tfvars.
Every file is parsed with python-hcl2 before anything is written, and then written atomically, so a
bad template leaves generated/ as it was.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from remotefit.errors import UserError
from remotefit.node import NODE_DIR, USER_DATA_FILES
from remotefit.proc import atomic_write, ensure_writable

TERRAFORM_REQUIRED_VERSION = ">= 1.11"
# The mirrored provider is 5.100; 5.60 brought everything the templates use.
AWS_PROVIDER_CONSTRAINT = ">= 5.60, < 6.0"
# Files the templates read with file()/templatefile(), copied beside the rendered .tf files (from the
# installed remotefit/node/ package data).
NODE_FILES = USER_DATA_FILES


def template_context() -> dict[str, Any]:
    return {
        "terraform_required_version": TERRAFORM_REQUIRED_VERSION,
        "aws_provider_constraint": AWS_PROVIDER_CONSTRAINT,
    }


def render_templates(templates: Path, context: Mapping[str, Any]) -> dict[str, str]:
    """Render every `*.j2` under `templates` → {output name: text}. Pure: writes nothing."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701 - HCL, not HTML
    )
    out: dict[str, str] = {}
    for tpl in sorted(templates.glob("*.j2")):
        try:
            out[tpl.stem] = env.get_template(tpl.name).render(**context)
        except jinja2.UndefinedError as exc:
            line = _template_line(exc, tpl.name)
            raise UserError(
                f"{tpl.relative_to(templates.parent)}{line}: {exc.message}; define it in "
                "remotefit/render.py template_context() or remove it from the template"
            ) from None
        except jinja2.TemplateSyntaxError as exc:
            raise UserError(
                f"{tpl.relative_to(templates.parent)}:{exc.lineno}: Jinja syntax error: {exc.message}"
            ) from None
    return out


def _template_line(exc: BaseException, name: str) -> str:
    tb = exc.__traceback__
    line = ""
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(name):
            line = f":{tb.tb_lineno}"
        tb = tb.tb_next
    return line


def check_hcl(name: str, text: str) -> dict[str, Any]:
    """Parse with python-hcl2; a syntax error names the rendered file and line."""
    import hcl2

    try:
        return hcl2.loads(text)
    except Exception as exc:  # lark's UnexpectedInput and friends carry line numbers
        line = getattr(exc, "line", None)
        where = f":{line}" if isinstance(line, int) and line > 0 else ""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{name}{where}: rendered HCL does not parse ({first}); fix the template it came from"
        ) from None


def holds(path: Path, text: str) -> bool:
    """Whether `path` already holds exactly `text`. We write rendered HCL only after check_hcl passed, and the
    same text parses the same way, so an unchanged file needs no second parse (python-hcl2 loads a ~0.13 CPU-s
    parser per process: most `inv` runs re-render what is already there)."""
    try:
        return path.read_text() == text
    except (OSError, UnicodeDecodeError):
        return False


def render_terraform(templates: Path, out_dir: Path, context: Mapping[str, Any] | None = None) -> list[Path]:
    """Render templates into `out_dir`, checking every file before writing any of them."""
    rendered = render_templates(templates, context or template_context())
    changed = {name: text for name, text in rendered.items() if not holds(out_dir / name, text)}
    for name, text in changed.items():
        if name.endswith(".tf"):
            check_hcl(f"generated/terraform/{name} (from templates/{name}.j2)", text)
    ensure_writable(out_dir)
    for name, text in changed.items():  # an unchanged file is left as it is: no rewrite, no fsync
        atomic_write(out_dir / name, text)
    written = [out_dir / name for name in rendered]
    for extra in sorted(templates.glob("*.tftpl")):
        shutil.copyfile(extra, out_dir / extra.name)
        written.append(out_dir / extra.name)
    written += write_node_files(out_dir)
    # A template removed from templates/ must not linger as a stale .tf file.
    for stale in out_dir.glob("*.tf"):
        if stale.name not in rendered:
            stale.unlink()
    return written


def compact_python(source: str) -> str:
    """The same module without comments and its functions' and classes' docstrings (for the size-capped
    user data); the module's own docstring stays (a script's --help may print it)."""
    import ast

    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Module):
            continue
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            del body[0]
            if not body:
                body.append(ast.Pass())
    return ast.unparse(tree) + "\n"


def write_node_files(out_dir: Path) -> list[Path]:
    """Copy the node files the user data embeds (remotefit/node/) beside the rendered templates."""
    written = []
    for name in NODE_FILES:
        if name.endswith(".py"):
            # EC2 caps user data at 16 KB (gzipped, base64): the node's Python goes in without its prose
            # (the same code: tests/test_user_data.py compares it with the packaged module).
            source = (NODE_DIR / name).read_text()
            shebang = source.splitlines()[0] + "\n" if source.startswith("#!") else ""
            atomic_write(out_dir / name, shebang + compact_python(source))
        else:
            shutil.copyfile(NODE_DIR / name, out_dir / name)
        written.append(out_dir / name)
    return written


def hcl_value(value: Any) -> str:
    """Render a Python value as an HCL literal. JSON syntax is valid HCL once `${`/`%{` are escaped."""
    if value is None:
        return "null"
    text = json.dumps(value)
    return text.replace("${", "$${").replace("%{", "%%{")


def hcl_assignments(values: Mapping[str, Any]) -> str:
    width = max((len(k) for k in values), default=0)
    return "".join(f"{k.ljust(width)} = {hcl_value(v)}\n" for k, v in values.items())


def write_hcl_file(path: Path, values: Mapping[str, Any], header: str) -> Path:
    """Write `key = value` lines (a tfvars or backend config), checked with python-hcl2, atomically."""
    text = f"# {header}\n" + hcl_assignments(values)
    if holds(path, text):
        return path  # checked when it was written: the same text parses the same way
    check_hcl(path.name, text)
    ensure_writable(path.parent)
    atomic_write(path, text)
    return path


def terraformrc_text(mirror: Path) -> str:
    """A CLI config that installs providers from a filesystem mirror only (air-gapped sites)."""
    p = json.dumps(str(mirror))
    return (
        "# Written by remotefit: install providers from the configured filesystem mirror.\n"
        "provider_installation {\n"
        f'  filesystem_mirror {{\n    path    = {p}\n    include = ["*/*/*"]\n  }}\n'
        '  direct {\n    exclude = ["*/*/*"]\n  }\n'
        "}\n"
    )
