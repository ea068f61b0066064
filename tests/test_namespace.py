"""One import namespace: nothing the checkout puts on sys.path carries another distribution's import name.

The repository root is on sys.path for pytest, `streamlit run app.py` and `python -m headlab`; a
top-level package there named like an installed distribution's shadows it (a root-level `kernels/`
once hid Hugging Face's `kernels`, which transformers >= 5.25 imports with every model class).
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OWN_DISTRIBUTION = "headlab"
# transformers' hub-kernel integration and our kernels, each from where it belongs
CHECK = (
    "import importlib.util, sys\n"
    "import transformers.integrations.hub_kernels\n"
    "from transformers import AutoModelForCausalLM\n"
    "from headlab.kernels import head_sparse_attention, triton_available\n"
    "import headlab.kernels\n"
    "print(importlib.util.find_spec('kernels').origin)\n"
    "print(headlab.kernels.__file__)\n"
)


def checkout_files(root: Path = ROOT) -> list[str]:
    """The project's files as git sees them: tracked and new, less the ignored (no venvs, builds or caches)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    return out.splitlines()


def project_top_level_names(files: list[str]) -> set[str]:
    """The names `import NAME` finds in the repository root: its .py files and its folders holding Python code."""
    names = set()
    for f in files:
        first, *rest = f.split("/")
        if f.endswith(".py") and first.isidentifier() if rest else first.endswith(".py"):
            names.add(first.removesuffix(".py"))
    return {n for n in names if n.isidentifier()}


def distribution_top_level_names(dist: metadata.Distribution) -> set[str]:
    """The top-level import names a distribution installs: its top_level.txt, else the first part of its files."""
    listed = dist.read_text("top_level.txt")
    if listed:
        return {n for n in listed.split() if n}
    names = set()
    for f in dist.files or ():
        first = f.parts[0] if f.parts else ""
        if not first or first == ".." or first.endswith((".dist-info", ".data", ".pth")) or first == "__pycache__":
            continue
        if len(f.parts) > 1:
            names.add(first)
        elif first.endswith(".py") or first.endswith(".so"):
            names.add(first.split(".")[0])
    return {n for n in names if n.isidentifier()}


def installed_top_level_names() -> dict[str, set[str]]:
    """Top-level import name -> the installed distributions (other than HeadLab) that provide it."""
    found: dict[str, set[str]] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower() != OWN_DISTRIBUTION:
            for top in distribution_top_level_names(dist):
                found.setdefault(top, set()).add(name)
    return found


def test_the_project_has_one_importable_package():
    """Beside `headlab`, the root holds only the app's scripts, tests, benchmarks and setup.py."""
    assert project_top_level_names(checkout_files()) == {"headlab", "app", "pages", "tests", "bench", "setup"}
    assert not [p for p in ("engine", "kernels", "ui") if (ROOT / p).exists()]


def test_no_top_level_name_of_the_project_is_an_installed_distributions():
    installed = installed_top_level_names()
    assert "kernels" in installed, "Hugging Face's kernels (a transformers dependency) should be installed"
    clashes = {name: sorted(installed[name]) for name in project_top_level_names(checkout_files()) if name in installed}
    assert not clashes, f"the checkout shadows these distributions' import names: {clashes}"


def test_the_guard_finds_a_clash():
    """A root-level kernels/ package is seen as `kernels`, which an installed distribution provides."""
    files = ["kernels/__init__.py", "kernels/csrc/x.cpp", "app.py", "docs/a.md", "data/prompts/x.jsonl", "README.md"]
    assert project_top_level_names(files) == {"kernels", "app"}
    assert "kernels" in distribution_top_level_names(metadata.distribution("kernels"))
    assert "kernels" in installed_top_level_names()


@pytest.mark.parametrize("where", ["repository root", "empty folder"])
def test_transformers_kernels_and_ours_both_import(where, tmp_path):
    cwd = ROOT if where == "repository root" else tmp_path
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", CHECK], cwd=cwd, env=env, check=False, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    hf_kernels, ours = done.stdout.split()
    assert Path(hf_kernels).parent.parent.name in ("site-packages", "dist-packages"), hf_kernels
    assert Path(ours) == ROOT / "headlab" / "kernels" / "__init__.py"  # make setup's editable install, or the root
