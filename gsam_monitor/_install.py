"""The ``pip install`` command that adds an optional extra, for the way this copy was installed.

``install_hint("tensorboard", "tensorboard")`` is what an ``ImportError`` for a missing optional
dependency quotes. The requirement it names depends on where the imported ``gsam_monitor``
came from, read from the ``gsam-monitor`` distribution's PEP 610 ``direct_url.json``:

* an index (a wheel or sdist from PyPI: no ``direct_url.json``): ``"gsam-monitor[tensorboard]"``;
* an editable install of a local folder (``dir_info.editable``): ``-e "/path/to/clone[tensorboard]"``;
* a local folder, not editable (``pip install /path/to/clone``): ``"/path/to/clone[tensorboard]"``,
  while that folder still exists; a local archive (wheel, sdist) likewise, by its path;
* a remote URL or VCS checkout: ``"gsam-monitor[tensorboard] @ <url>"``;
* no installed distribution owns the imported package, which runs from a source tree on
  ``sys.path`` (a ``pyproject.toml`` naming gsam-monitor beside it): ``-e "/path/to/tree[tensorboard]"``.

A distribution counts only if it owns the imported package (its ``RECORD`` lists it, or it is
an editable install of the folder it lies in): a stale ``gsam_monitor.egg-info`` of a source tree
found through the working directory is not mistaken for an index install. Anything unclear
falls back to the index form. Arguments are quoted so that zsh does not glob the brackets.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
from pathlib import Path
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

__all__ = ["install_hint"]

DISTRIBUTION = "gsam-monitor"
_PROJECT_NAME = re.compile(r"""^\s*name\s*=\s*["']gsam[-_.]monitor["']""", re.MULTILINE | re.IGNORECASE)


def install_hint(extra: str, package: str | None = None) -> str:
    """The command that installs ``extra``, as text for an error message.

    Args:
        extra: the optional-dependency group of gsam-monitor (``"tensorboard"``, ``"hf"``, ...).
        package: the bare pip package the extra provides, offered as the alternative.

    Returns:
        e.g. ``"`pip install \\"gsam-monitor[wandb]\\"` (or `pip install wandb`)"``.
    """
    hint = f"`pip install {_requirement(extra)}`"
    return hint if package is None else f"{hint} (or `pip install {_quote(package)}`)"


def _quote(argument: str) -> str:
    """``argument`` as one shell word: bare when no shell treats it specially, else in double
    quotes (which also work in cmd.exe and PowerShell), or ``shlex.quote``'s single quotes
    where a POSIX shell would expand something inside double quotes."""
    if not argument:
        return '""'
    if re.fullmatch(r"[\w@%+=:,./-]+", argument):
        return argument
    if os.name == "nt" or not re.search(r'["$`\\!]', argument):
        return f'"{argument}"'
    return shlex.quote(argument)


def _requirement(extra: str) -> str:
    """The ``pip install`` arguments that add ``extra`` from where the package came from."""
    source = _installed_from()
    if source is None:
        return _quote(f"{DISTRIBUTION}[{extra}]")
    kind, where = source
    if kind == "url":
        return _quote(f"{DISTRIBUTION}[{extra}] @ {where}")
    target = _quote(f"{where}[{extra}]")
    return f"-e {target}" if kind == "editable" else target


def _package_dir() -> Path:
    """The folder of the imported ``gsam_monitor`` package."""
    return Path(__file__).resolve().parent


def _installed_from() -> tuple[str, str] | None:
    """``("editable" | "local" | "url", where)`` for the imported package, ``None`` for an index."""
    package = _package_dir()
    try:
        candidates = list(importlib.metadata.distributions(name=DISTRIBUTION))
    except Exception:  # a broken metadata folder elsewhere on sys.path: say the plain thing
        candidates = []
    for dist in candidates:
        direct = _direct_url(dist)
        local = _file_path(direct.get("url")) if direct else None
        if direct and direct.get("dir_info", {}).get("editable") and local and _inside(package, local):
            return "editable", str(local)
        if not _owns(dist, package):
            continue
        if not direct:
            return None  # from an index
        if local is not None:
            return ("local", str(local)) if local.exists() else None
        return "url", _pip_url(direct)
    root = package.parent
    pyproject = root / "pyproject.toml"
    try:
        if pyproject.is_file() and _PROJECT_NAME.search(pyproject.read_text(encoding="utf-8")):
            return "editable", str(root)
    except (OSError, UnicodeDecodeError):
        pass
    return None


def _direct_url(dist: importlib.metadata.Distribution) -> dict | None:
    """The distribution's ``direct_url.json`` (PEP 610), ``None`` if absent or unreadable."""
    try:
        text = dist.read_text("direct_url.json")
        data = json.loads(text) if text else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("url"), str) else None


def _file_path(url: str | None) -> Path | None:
    """The local path of a ``file:`` URL, else ``None``."""
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme != "file":
        return None
    host = "" if parts.netloc in ("", "localhost") else f"//{parts.netloc}"
    return Path(url2pathname(host + unquote(parts.path)) if os.name == "nt" else host + unquote(parts.path))


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except (OSError, ValueError):
        return False
    return True


def _owns(dist: importlib.metadata.Distribution, package: Path) -> bool:
    """Whether ``dist`` installed the files of ``package`` (its RECORD or installed-files.txt,
    not the SOURCES.txt of an egg-info left in a source tree)."""
    try:
        if dist.read_text("RECORD") is None and dist.read_text("installed-files.txt") is None:
            return False
        init = (package / "__init__.py").resolve()
        return any(Path(dist.locate_file(f)).resolve() == init for f in dist.files or ())
    except Exception:
        return False


def _pip_url(direct: dict) -> str:
    """A PEP 508 URL pip accepts for a remote ``direct_url.json``: VCS prefix and revision,
    subdirectory fragment."""
    url = direct["url"]
    vcs = direct.get("vcs_info")
    if isinstance(vcs, dict) and vcs.get("vcs"):
        revision = vcs.get("requested_revision") or vcs.get("commit_id")
        url = f"{vcs['vcs']}+{url}" + (f"@{revision}" if revision else "")
    if direct.get("subdirectory"):
        url += f"#subdirectory={direct['subdirectory']}"
    return url
