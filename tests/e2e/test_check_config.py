"""`patgate check-config` as an operator runs it before a deploy."""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson
import pytest
import yaml

from tests.e2e.support import EXAMPLE_CONFIG, clean_env, no_traceback, run_cli

BROKEN = """\
listen: {host: 127.0.0.1, port: 8080}
frobnicate: true
roles:
  admin: ["jobs:*"]
  field_user: ["Jobs Read"]
routes:
  - name: jobs
    match: {prefix: /api/jobs}
    upstream: http://127.0.0.1:9000
  - name: slow
    match: {prefix: /api/slow}
    upstream: http://127.0.0.1:9000
    timeout: banana
  - name: jobs
    match: {prefix: /api/other}
    upstream: http://127.0.0.1:9000
  - name: both
    match: {path: /exact, prefix: /api/both}
    upstream: http://127.0.0.1:9000
"""

# Every mistake in BROKEN, by the key path it must be reported under.
MISTAKES = {
    "frobnicate": "unknown key",
    "roles.field_user[0]": "permission",
    "routes[1].timeout": 'expected a duration like 30s, got "banana"',
    "routes[2].name": "duplicate",
    "routes[3].match": "not both",
}


def example_routes() -> int:
    return len(yaml.safe_load(EXAMPLE_CONFIG.read_text(encoding="utf-8"))["routes"])


def check_config(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    result = run_cli(["check-config", *args], clean_env(), tmp_path)
    no_traceback(result)
    return result.returncode, result.stdout, result.stderr


def test_the_example_config_is_valid(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    shutil.copy(EXAMPLE_CONFIG, config)

    code, stdout, stderr = check_config(tmp_path, "--config", str(config), "--json")

    assert code == 0, stderr
    assert orjson.loads(stdout) == {"ok": True, "routes": example_routes()}


def test_the_default_path_is_config_gateway_yaml(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    shutil.copy(EXAMPLE_CONFIG, tmp_path / "config" / "gateway.yaml")

    code, stdout, stderr = check_config(tmp_path, "--json")

    assert code == 0, stderr
    assert orjson.loads(stdout) == {"ok": True, "routes": example_routes()}


def test_every_mistake_is_reported_with_its_key_path(tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text(BROKEN, encoding="utf-8")

    code, stdout, stderr = check_config(tmp_path, "--config", str(config))

    assert code == 2
    assert stdout == ""
    lines = stderr.splitlines()
    for path, words in MISTAKES.items():
        matching = [line for line in lines if line.startswith(f"patgate: config: {path}: ")]
        assert len(matching) == 1, f"{path} not reported once in:\n{stderr}"
        assert words in matching[0], matching[0]
    assert len(lines) == len(MISTAKES), stderr


def test_a_valid_config_built_from_parts_passes(tmp_path: Path) -> None:
    """The fixed version of BROKEN passes: the errors above are the mistakes, not the rest."""
    fixed = (
        BROKEN.replace("frobnicate: true\n", "")
        .replace('"Jobs Read"', '"jobs:read"')
        .replace("banana", "30s")
        .replace(
            "name: jobs\n    match: {prefix: /api/other}",
            "name: other\n    match: {prefix: /api/other}",
        )
        .replace("path: /exact, prefix: /api/both", "path: /exact")
    )
    config = tmp_path / "fixed.yaml"
    config.write_text(fixed, encoding="utf-8")

    code, stdout, stderr = check_config(tmp_path, "--config", str(config), "--json")

    assert code == 0, stderr
    assert orjson.loads(stdout) == {"ok": True, "routes": 4}


def test_a_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "syntax.yaml"
    config.write_text("routes:\n  - name: [unclosed\n    upstream: x\n", encoding="utf-8")

    code, _, stderr = check_config(tmp_path, "--config", str(config))

    assert code == 2
    assert str(config) in stderr
    assert "YAML" in stderr
    assert stderr.startswith("patgate: config: ")


@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_missing_file_is_a_config_error(tmp_path: Path, how: str) -> None:
    missing = tmp_path / "nowhere.yaml"
    args = ["check-config", "--config", str(missing)] if how == "flag" else ["check-config"]
    env = clean_env(PATGATE_CONFIG=str(missing)) if how == "env" else clean_env()

    result = run_cli(args, env, tmp_path)

    assert result.returncode == 2
    assert str(missing) in result.stderr
    assert "cannot read" in result.stderr
    no_traceback(result)
