"""The documentation is true to the code: its code blocks run, its commands exist, the site builds.

- Every ```python block of README.md and docs/ runs, in page order, in one namespace per page
  (a later block may use an earlier block's names), in an empty working directory. A block
  that cannot run here is preceded by ``<!-- skip: <why> -->``; a block that uses the user's own
  objects (``model``, ``batches``) is preceded by a hidden ``<!-- test-setup ... -->`` comment
  that builds small offline stand-ins (``tests/docs_fixtures.py``).
- Every ```bash block's commands name scripts that exist, flags those scripts define, and pip
  extras that ``pyproject.toml`` defines.
- ``mkdocs build --strict`` succeeds (broken links, anchors and docstrings fail it), every public
  object has its entry in the API reference, and no Sphinx role is left unrendered.
- The README is a front door: at most 250 lines, its links into the docs resolve.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
FENCE = re.compile(r"^(\s*)```([\w+-]*)")
SKIP = re.compile(r"^\s*<!--\s*skip:(.*?)-->\s*$")


@dataclass
class Block:
    lang: str
    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None  # the reason, when marked
    setup: str  # hidden setup code run before this block


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, with their skip marks and hidden setups."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i, setup, skip = 0, "", None
    while i < len(lines):
        line = lines[i]
        if line.strip().startswith("<!-- test-setup"):
            end = next(j for j in range(i, len(lines)) if lines[j].strip().endswith("-->"))
            setup += "\n".join(lines[i + 1 : end]) + "\n"
            i = end + 1
            continue
        if m := SKIP.match(line):
            skip = m.group(1).strip()
            i += 1
            continue
        if m := FENCE.match(line):
            indent, lang = m.group(1), m.group(2)
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            body = [row[len(indent) :] if row.startswith(indent) else row for row in lines[i + 1 : end]]
            out.append(Block(lang, i + 1, "\n".join(body) + "\n", skip, setup))
            setup, skip = "", None
            i = end + 1
            continue
        if line.strip():
            skip = None  # a mark applies to the block right after it
        i += 1
    return out


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_the_pages_have_code_blocks_to_check() -> None:
    assert len(PAGES) >= 15
    langs = [b.lang for page in PAGES for b in blocks(page)]
    assert langs.count("python") >= 8 and langs.count("bash") >= 8


PYTHON_PAGES = [p for p in PAGES if any(b.lang == "python" for b in blocks(p))]


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=page_id)
def test_python_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runnable = [b for b in blocks(page) if b.lang == "python"]
    for block in runnable:
        if block.skip is not None:
            assert len(block.skip) >= 10, f"{page_id(page)}:{block.line}: a skipped block says why"
    runnable = [b for b in runnable if b.skip is None]
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for block in runnable:
        source = block.setup + block.code
        code = compile(source, f"{page_id(page)}:{block.line}", "exec")
        exec(code, namespace)  # the documentation's own code, as a reader runs it


# ------------------------------------------------------------------ commands
def _eval_sources() -> str:
    return "".join(p.read_text(encoding="utf-8") for p in (ROOT / "gsam_monitor" / "eval").glob("*.py"))


def _flags_defined(source: str) -> set[str]:
    """The option strings of every ``add_argument`` call in a module's source."""
    flags: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return flags


def _commands(code: str) -> list[list[str]]:
    """Each command of a shell block as words: continuations joined, comments dropped, split at
    ``&&``, ``;`` and ``|``."""
    joined = code.replace("\\\n", " ")
    out: list[list[str]] = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        current: list[str] = []
        for w in [*words, "&&"]:
            if w in ("&&", ";", "|", "||"):
                if current:
                    out.append(current)
                current = []
            else:
                current.append(w)
    return out


def _extras() -> set[str]:
    """The names of ``[project.optional-dependencies]`` in pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+)\s*=", section, flags=re.M))


EXTRAS = _extras()


def check_command(words: list[str]) -> list[str]:
    """What is wrong with one documented command (nothing: [])."""
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # environment assignments
        words = words[1:]
    if not words:
        return []
    problems: list[str] = []
    if words[0] == "pip" and "install" in words:
        for w in words:
            if m := re.fullmatch(r"(?:\.|gsam-monitor|\S*/main)\[([\w,-]+)\]", w):
                problems += [f"extra {e!r} is not in pyproject.toml" for e in m.group(1).split(",") if e not in EXTRAS]
        return problems
    if words[0] == "torchrun":
        words = ["python", *[w for w in words[1:] if not w.startswith("--nproc")]]
    if words[0] != "python":
        return []
    args = words[1:]
    if args[:2] == ["-m", "gsam_monitor.eval"]:
        flags, rest = _flags_defined(_eval_sources()), args[2:]
    elif args[:1] == ["-m"]:
        return []
    elif args and args[0].endswith(".py"):
        script = ROOT / args[0]
        if not script.is_file():
            return [f"{args[0]} does not exist"]
        flags, rest = _flags_defined(script.read_text(encoding="utf-8")), args[1:]
    else:
        return []
    for w in rest:
        if w.startswith("--") and w.split("=")[0] not in flags:
            problems.append(f"{' '.join(args[:2])}: no flag {w.split('=')[0]}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_shell_commands_name_real_scripts_flags_and_extras(page: Path) -> None:
    problems = []
    for block in blocks(page):
        if block.lang in ("bash", "sh", "console"):
            for words in _commands(block.code):
                problems += [f"{page_id(page)}:{block.line}: {p}" for p in check_command(words)]
    assert not problems, "\n".join(problems)


def test_the_command_check_catches_a_wrong_flag_script_or_extra() -> None:
    assert check_command(["python", "-m", "gsam_monitor.eval", "--models", "minilm"]) != []
    assert check_command(["python", "-m", "gsam_monitor.eval", "--model", "minilm"]) == []
    assert check_command(["python", "examples/nope.py"]) != []
    assert check_command(["pip", "install", ".[tensorbord]"]) != []
    assert check_command(["pip", "install", "-e", ".[test]"]) == []


# ------------------------------------------------------------------ the site
@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return out


def _public_objects() -> list[tuple[str, str]]:
    """Each public object's import path and its defining path (``module.qualname``)."""
    import gsam_monitor
    import gsam_monitor.analysis
    import gsam_monitor.callbacks
    import gsam_monitor.eval
    import gsam_monitor.metrics

    out = []
    modules = (gsam_monitor, gsam_monitor.metrics, gsam_monitor.analysis, gsam_monitor.eval, gsam_monitor.callbacks)
    for module in modules:
        for name in module.__all__:
            obj = getattr(module, name)
            if obj is gsam_monitor.metrics:
                continue
            where = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', name)}"
            out.append((f"{module.__name__}.{name}", where))
    return out


def test_every_public_object_is_in_the_api_reference(site: Path) -> None:
    html = "".join(p.read_text(encoding="utf-8") for p in (site / "reference").rglob("*.html"))
    ids = set(re.findall(r'id="(gsam_monitor[\w.]*)"', html))
    missing = [path for path, where in _public_objects() if path not in ids and where not in ids]
    assert not missing, f"not in the API reference: {missing}"


def test_every_public_member_of_the_top_level_classes_is_documented(site: Path) -> None:
    """Methods, properties and the monitor's read-only views (``last_metrics``, ``fired_alerts``,
    ...: attributes made by a helper, documented through ``scripts/griffe_views.py``)."""
    import gsam_monitor

    html = (site / "reference" / "monitor" / "index.html").read_text(encoding="utf-8")
    html += (site / "reference" / "stats" / "index.html").read_text(encoding="utf-8")
    ids = set(re.findall(r'id="(gsam_monitor[\w.]*)"', html))
    missing = []
    for name in ("GSAMMonitor", "LayerStats", "ReservoirSample"):
        cls = getattr(gsam_monitor, name)
        members = [m for m in vars(cls) if not m.startswith("_")]
        missing += [f"{name}.{m}" for m in members if f"gsam_monitor.{name}.{m}" not in ids]
    assert not missing, f"public members without an entry in the API reference: {missing}"


def test_no_docstring_markup_is_left_unrendered(site: Path) -> None:
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        roles = re.findall(r":(?:func|class|meth|mod|attr|data):`", text)
        assert not roles, f"{page.relative_to(site)} shows Sphinx roles {roles[:3]}"


def test_the_readme_is_a_front_door() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    targets = re.findall(r"\]\(((?!https?:)[^)#]+)(?:#[^)]*)?\)", readme)
    assert any(t.startswith("docs/") for t in targets)
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"
