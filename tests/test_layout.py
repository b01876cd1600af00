"""The project's shape, checked: imports between the top folders run one way, the
runtime names nothing of the domain, every setting is documented, and the stage
registry is the one list of stages."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from stages.app import APP
from stages.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("benchmarks", "stages", "pipeline", "schemas")
ALLOWED = {
    "benchmarks": {"benchmarks", "stages", "pipeline", "schemas"},
    "stages": {"stages", "pipeline", "schemas", "sql"},
    "pipeline": {"pipeline", "schemas"},
    "schemas": {"schemas"},
}
"""Which of the project's top folders each may import: benchmarks -> stages -> pipeline
-> schemas, never back (sql holds the migrations, which the application hands over)."""
PROJECT = {*PACKAGES, "sql", "tests"}
DOMAIN_WORDS = re.compile(r"device|allocat|quota|billing|tenant|\{pool\}|free pool|\bpools\b",
                          re.IGNORECASE)
"""The scheduler's words; "pool" alone is allowed for connection pools."""


def imported_top_folders(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & PROJECT


def test_imports_between_top_folders_run_one_way() -> None:
    wrong = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for target in imported_top_folders(path) - ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not wrong, wrong


def test_the_import_check_sees_lazy_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from stages.tools import cli\n    import benchmarks.run\n")
    assert imported_top_folders(module) == {"stages", "benchmarks"}


def test_the_runtime_names_nothing_of_the_domain() -> None:
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in sorted((ROOT / "pipeline").rglob("*"))
        if path.is_file() and path.suffix in {".py", ".lua"}
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if DOMAIN_WORDS.search(line)
    ]
    assert not hits, hits


def test_every_setting_is_in_the_readme_configuration_table() -> None:
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", readme, re.MULTILINE))
    assert set(Settings.variables()) <= documented, set(Settings.variables()) - documented


def test_a_setting_is_read_from_its_variable_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    mp = monkeypatch
    mp.setenv("DEVSCHED_EXPIRE_BATCH", "7")
    mp.setenv("DEVSCHED_QUOTA_FAIL_OPEN", "yes")
    mp.setenv("DEVSCHED_BATCH_SIZE", "")
    s = Settings.from_env()
    assert (s.expire_batch, s.quota_fail_open, s.batch_size) == (7, True, 256)
    mp.setenv("DEVSCHED_TICK_MS", "5")
    with pytest.raises(ValueError, match="DEVSCHED_TICK_MS must be >= 10"):
        Settings.from_env()
    mp.setenv("DEVSCHED_TICK_MS", "soon")
    with pytest.raises(ValueError, match="DEVSCHED_TICK_MS must be an integer"):
        Settings.from_env()


def test_the_procfile_runs_every_registered_stage_once() -> None:
    lines = [ln.split(":", 1) for ln in (ROOT / "Procfile").read_text().splitlines() if ln.strip()]
    assert [name for name, _ in lines] == APP.stage_names
    assert all(cmd.split() == ["devsched", "worker", name] for name, cmd in lines)
