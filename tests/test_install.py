"""HeadLab as an installed tool: a wheel built from the checkout, installed in a fresh venv, run from elsewhere.

The wheel is built as `python -m build` builds it (a source distribution, then the wheel from that),
from a copy of the checkout, and installed with --no-deps into a fresh venv that sees the packages of
the interpreter running the tests (torch and the rest), whether `make setup` installed them into the
system's Python or into a venv of its own (`see_packages_of_this_interpreter`). Every run of the installed
`headlab` starts in an empty folder outside the checkout, so nothing is found by accident in the
checkout or through `make setup`'s editable install.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
import venv
import zipfile
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from headlab import __version__
from headlab import app as launcher
from headlab.cli import build_parser as headlab_parser
from headlab.cli import main as headlab_main
from headlab.engine.cli.main import build_parser as engine_parser
from headlab.ui.server_options import ALLOW_REMOTE_CODE_FLAG
from tests.browser import VIEWPORT, connects, free_port, grid_shape, wait_idle
from tests.tiny import save_tiny

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TEST_TOOLS = {"pytest", "pytest-xdist", "playwright", "build"}  # requirements.txt's lines that are not the product's
SLOW = 180


def _verbs(parser) -> list[str]:
    return list(next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices)




def _checkout_files() -> list[str]:
    """The checkout's files as git sees them: tracked and new, less the ignored (no caches, no artifacts)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


# ---- the command and the launcher, in this process -------------------------------------------------------------

def test_headlab_has_every_engine_verb_and_app():
    assert _verbs(headlab_parser()) == [*_verbs(engine_parser()), "app"]
    assert headlab_parser().prog == "headlab"


def test_app_and_version_start_without_the_engine_and_answer_as_the_full_parser(capsys, monkeypatch):
    """`headlab app` / `--version` skip the engine's imports; they print what the full parser's verb prints."""
    monkeypatch.delenv("HEADLAB_ADDRESS", raising=False)
    monkeypatch.delenv("HEADLAB_PORT", raising=False)
    argv = ["app", "--port", "8700", "--dry-run", "--", "--allow-remote-code"]
    assert headlab_main(argv) == 0
    fast = capsys.readouterr().out
    args = headlab_parser().parse_args(argv)
    assert args.func(args) == 0
    assert capsys.readouterr().out == fast
    assert headlab_main(["--version"]) == 0
    assert capsys.readouterr().out == "headlab 0.1.0\n"
    with pytest.raises(SystemExit):
        headlab_parser().parse_args(["--version"])
    assert capsys.readouterr().out == "headlab 0.1.0\n"
    with pytest.raises(SystemExit):
        headlab_main(["app", "--help"])
    assert capsys.readouterr().out.startswith("usage: headlab app ")


def test_app_without_its_files_is_a_clear_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(launcher, "_ROOTS", (tmp_path,))
    assert headlab_main(["app", "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith("error: the app's files")


def test_python_m_headlab_is_the_only_way_to_run_the_cli_from_a_checkout():
    """`python -m headlab` is the `headlab` command; no other package of the checkout runs as a CLI."""
    assert [f for f in _checkout_files() if f.endswith("__main__.py")] == ["headlab/__main__.py"]
    assert engine_parser().prog == "headlab" and "app" not in _verbs(engine_parser())
    done = subprocess.run([sys.executable, "-m", "headlab", "--version"], cwd=ROOT, env=_env(), check=False,
                          capture_output=True, text=True, timeout=SLOW)
    assert (done.returncode, done.stdout) == (0, "headlab 0.1.0\n"), done.stderr


def test_version_is_pyprojects():
    assert __version__ == PYPROJECT["project"]["version"] == "0.1.0"
    assert PYPROJECT["project"]["scripts"] == {"headlab": "headlab.cli:main"}


def test_dependencies_mirror_requirements_and_pin_torch():
    """pyproject.toml names requirements.txt's packages (its ranges end at the lock: tests/test_lock.py)."""
    def names(lines):
        return {canonicalize_name(Requirement(line).name) for line in lines}

    required = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert names(PYPROJECT["project"]["dependencies"]) == names(required) - TEST_TOOLS
    assert names(PYPROJECT["project"]["optional-dependencies"]["test"]) == TEST_TOOLS
    pins = [line.strip() for line in (ROOT / "constraints.txt").read_text().splitlines()
            if line.startswith("torch==")]
    assert pins and pins[0] in PYPROJECT["project"]["dependencies"]


def test_launcher_passes_every_setting_of_the_streamlit_config():
    """streamlit reads .streamlit/config.toml only from the folder it starts in: `headlab app` passes it all."""
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    flat = {f"{section}.{key}": str(value).lower() if isinstance(value, bool) else str(value)
            for section, values in config.items() for key, value in values.items()}
    assert flat == {**launcher.SERVER_DEFAULTS, "server.address": launcher.DEFAULT_ADDRESS}
    assert launcher.DEFAULT_ADDRESS == "127.0.0.1" and launcher.DEFAULT_PORT == 8501
    assert launcher.ALLOW_REMOTE_CODE_FLAG == ALLOW_REMOTE_CODE_FLAG


def test_streamlit_command_line():
    cmd = launcher.streamlit_command(root=ROOT)
    assert cmd[:5] == [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py")]
    options = dict(zip(cmd[5::2], cmd[6::2]))
    assert options["--server.address"] == "127.0.0.1" and options["--server.port"] == "8501"
    assert options["--server.headless"] == "true" and options["--browser.gatherUsageStats"] == "false"
    assert "--" not in cmd

    exposed = launcher.streamlit_command("0.0.0.0", 9000, ["--allow-remote-code"], root=ROOT)
    assert exposed[exposed.index("--server.address") + 1] == "0.0.0.0"
    assert exposed[exposed.index("--server.port") + 1] == "9000"
    assert exposed[-2:] == ["--", "--allow-remote-code"]


def test_app_verb_flags(capsys, monkeypatch):
    monkeypatch.delenv("HEADLAB_ADDRESS", raising=False)
    monkeypatch.delenv("HEADLAB_PORT", raising=False)
    args = headlab_parser().parse_args(["app", "--dry-run"])
    assert (args.address, args.port, args.app_args, args.allow_remote_code) == ("127.0.0.1", 8501, [], False)
    args = headlab_parser().parse_args(["app", "--port", "9001", "--", "--allow-remote-code"])
    assert (args.port, args.app_args) == (9001, ["--allow-remote-code"])

    monkeypatch.setenv("HEADLAB_ADDRESS", "0.0.0.0")  # as `HEADLAB_ADDRESS=0.0.0.0 make app`
    monkeypatch.setenv("HEADLAB_PORT", "8600")
    args = headlab_parser().parse_args(["app", "--allow-remote-code", "--dry-run"])
    assert (args.address, args.port) == ("0.0.0.0", 8600)
    assert args.func(args) == 0
    printed = capsys.readouterr().out.split()
    assert printed[printed.index("--server.address") + 1] == "0.0.0.0" and printed[-2:] == ["--", "--allow-remote-code"]

    for bad in ("0", "65536", "http"):
        with pytest.raises(SystemExit):
            headlab_parser().parse_args(["app", "--port", bad])
    assert "port" in capsys.readouterr().err


def test_app_root_prefers_the_installed_copy_and_names_what_is_missing(tmp_path):
    assert launcher.app_root() == ROOT  # a checkout: no headlab/_app, the files in place
    shipped = tmp_path / "_app"
    for f in ("app.py", "pages/heads.py"):
        (shipped / f).parent.mkdir(parents=True, exist_ok=True)
        (shipped / f).write_text("")
    assert launcher.app_root((shipped, ROOT)) == shipped
    with pytest.raises(FileNotFoundError, match=r"app.py, pages/\)"):
        launcher.app_root((tmp_path / "nothing",))


def test_the_command_modules_import_no_app_module_and_no_streamlit():
    """headlab/*.py (the command and its `app` verb) start without Streamlit or the app's helpers."""
    for path in (ROOT / "headlab").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [m for m in mods if m.split(".")[0] in ("streamlit", "pages", "app")
                        or m.startswith("headlab.ui")], path


# ---- the wheel, installed in a fresh venv --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """sdist and wheel, built by `python -m build --no-isolation` from a copy of the checkout."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for f in _checkout_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
                          check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def wheel(dist) -> Path:
    (found,) = dist.glob("headlab-0.1.0-*.whl")
    return found


def see_packages_of_this_interpreter(env_dir: Path) -> None:
    """Make the venv at env_dir see the site-packages this interpreter sees, after its own.

    `--system-site-packages` would show the *base* interpreter's packages: under a venv made by
    `make setup PY=.venv/bin/python` those are not the ones installed. A .pth file lists this
    interpreter's folders instead; its lines are plain paths, so the folders' own .pth files
    (`make setup`'s editable install of the checkout among them) are not run.
    """
    folders = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    assert folders, sys.path
    (own,) = (env_dir / "lib").glob("python*/site-packages")
    (own / "_this_interpreters_packages.pth").write_text("\n".join(folders) + "\n")


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv (the packages of the interpreter running the tests visible) with the wheel installed."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.create(env_dir, with_pip=False)
    see_packages_of_this_interpreter(env_dir)
    bin_dir = env_dir / "bin"
    # this machine's pip, run by the venv's Python, installs into the venv
    done = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
                          check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (bin_dir / "headlab").is_file()
    return bin_dir


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory) -> Path:
    """An empty folder outside the checkout to run the installed command from."""
    return tmp_path_factory.mktemp("cwd")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HEADLAB_ADDRESS", "HEADLAB_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def run_installed(bin_dir: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=cwd, env=_env(**env), check=False,
                          capture_output=True, text=True, timeout=SLOW)


def test_wheel_ships_the_app_the_data_and_the_kernel_source(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    app = "headlab/_app/"
    scripts = {
        "app.py", ".streamlit/config.toml", "bench/results/dynamic.csv", "bench/results/dynamic_decode.csv",
        *(str(p.relative_to(ROOT)) for p in (ROOT / "pages").glob("*.py")),
    }
    assert {app + f for f in scripts} <= names
    assert {n for n in names if n.startswith(app + "pages/")} == {app + f for f in scripts if f.startswith("pages/")}
    package = {p.relative_to(ROOT).as_posix() for d in ("engine", "kernels", "ui")
               for p in (ROOT / "headlab" / d).rglob("*.py")}
    assert package <= names
    ui_assets = {p.relative_to(ROOT).as_posix() for p in (ROOT / "headlab" / "ui" / "assets").iterdir() if p.is_file()}
    assert ui_assets and ui_assets <= names
    assert "headlab/kernels/csrc/gathered_ffn.cpp" in names
    data = {str(p.relative_to(ROOT / "data")) for p in (ROOT / "data").rglob("*") if p.is_file()}
    assert {"headlab/engine/data/shipped/" + f for f in data} <= names
    assert "headlab/cli.py" in names and "headlab/app.py" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_wheel_installs_one_top_level_import_name(wheel):
    """Everything importable is under `headlab`: the wheel's only other entry is its dist-info."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (dist_info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        top_level = z.read(f"{dist_info}/top_level.txt").decode().split()
    assert {n.split("/")[0] for n in names} == {"headlab", dist_info}
    assert top_level == ["headlab"]


def test_sdist_holds_what_the_wheel_copies(dist):
    (sdist,) = dist.glob("headlab-0.1.0.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"setup.py", "MANIFEST.in", "app.py", ".streamlit/config.toml", "headlab/ui/pages.py", "pages/heads.py",
            "data/wikitext-2-raw-test.txt", "headlab/kernels/csrc/gathered_ffn.cpp", "constraints.txt",
            "headlab/ui/assets/head_grid.js"} <= names


def test_the_venv_imports_the_wheels_copy(installed, elsewhere):
    prefix = str(installed.parent)
    done = run_installed(installed, elsewhere, "python", "-c",
                         "import headlab, headlab.engine as engine, headlab.kernels.compiled as c, headlab.app as a\n"
                         "from headlab.engine.data.datasets import DATA_DIR\n"
                         "print(headlab.__file__, engine.__file__, c.SOURCE, DATA_DIR, a.app_root(), sep='\\n')")
    assert done.returncode == 0, done.stderr
    headlab_file, engine_file, source, data_dir, app_root = done.stdout.split()
    for path in (headlab_file, engine_file, source, data_dir, app_root):
        assert path.startswith(prefix), path
    assert Path(source).is_file() and data_dir.endswith("headlab/engine/data/shipped")
    assert app_root.endswith("headlab/_app")
    assert not str(ROOT) in done.stdout


def test_installed_help_and_version(installed, elsewhere):
    done = run_installed(installed, elsewhere, "headlab", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: headlab ")
    for verb in (*_verbs(engine_parser()), "app"):
        assert verb in done.stdout
    done = run_installed(installed, elsewhere, "headlab", "--version")
    assert done.stdout.strip() == "headlab 0.1.0"
    done = run_installed(installed, elsewhere, "headlab", "suggest", "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: headlab suggest")


def test_installed_eval_matches_python_m_headlab_in_the_checkout(installed, elsewhere, tmp_path):
    model = save_tiny(tmp_path / "tiny-llama", "llama", context=512)
    done = run_installed(installed, elsewhere, "headlab", "eval", "--windows", "1", "--model", str(model))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "perplexity" in done.stdout and "1 windows" in done.stdout
    reference = subprocess.run([sys.executable, "-m", "headlab", "eval", "--windows", "1", "--model", str(model)],
                               cwd=ROOT, env=_env(), check=False, capture_output=True, text=True, timeout=SLOW)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert done.stdout == reference.stdout


def test_installed_app_command_line(installed, elsewhere):
    done = run_installed(installed, elsewhere, "headlab", "app", "--dry-run")
    assert done.returncode == 0, done.stderr
    cmd = done.stdout.split()
    assert cmd[:5] == [str(installed / "python"), "-m", "streamlit", "run",
                       str(installed.parent / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
                           / "site-packages" / "headlab" / "_app" / "app.py")]
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--server.port") + 1] == "8501"

    done = run_installed(installed, elsewhere, "headlab", "app", "--address", "0.0.0.0", "--port", "9000", "--dry-run",
                         "--", "--allow-remote-code")
    cmd = done.stdout.split()
    assert cmd[cmd.index("--server.address") + 1] == "0.0.0.0" and cmd[-2:] == ["--", "--allow-remote-code"]


class _Served:
    def __init__(self, bin_dir: Path, cwd: Path, log: Path, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen([str(bin_dir / "headlab"), "app", "--port", str(self.port)], cwd=cwd,
                                     env=_env(**env), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2).read() == b"ok":
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise AssertionError(f"`headlab app` did not start: {log.read_text()[-3000:]}") from None
                time.sleep(0.5)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def test_installed_app_serves_on_loopback_only(installed, elsewhere, tmp_path):
    served = _Served(installed, elsewhere, tmp_path / "app.log")
    try:
        assert connects("127.0.0.1", served.port)
        assert not connects("127.0.0.2", served.port)  # bound to 127.0.0.1, not to every address
    finally:
        served.close()


@pytest.mark.browser
def test_installed_app_opens_the_heads_page_in_chromium(installed, elsewhere, tmp_path, browser):
    """The wheel's own app.py, pages and ui, served by `headlab app` from an empty folder, draw a model."""
    model = save_tiny(tmp_path / "tiny-llama", "llama")
    served = _Served(installed, elsewhere, tmp_path / "app.log", HEADLAB_MODEL=str(model))
    page = browser.new_page(viewport=VIEWPORT)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(served.url, wait_until="domcontentloaded")
        page.get_by_text("Perplexity, with mask").first.wait_for(timeout=SLOW * 1000)
        wait_idle(page, SLOW)
        assert grid_shape(page) == (2, 4)
        assert page.locator('[data-testid="stException"]').count() == 0
        assert not errors
    finally:
        page.close()
        served.close()
    log = (tmp_path / "app.log").read_text()
    assert "Traceback" not in log, log[-3000:]
