"""The compiled CPU decode kernel (csrc/gathered_ffn.cpp): built once ahead of time, loaded lazily.

    python -m headlab.kernels.compiled        # what `make setup` runs: builds it, never fails the set-up
    module = load_built()             # the built module, or None (then `unavailable_reason()` says why)

The extension is built by torch.utils.cpp_extension (g++ and ninja, -O3 -march=native) into a
cache folder, ~/.cache/headlab/extensions (or $HEADLAB_EXTENSIONS), under a name that hashes its
source, flags, torch and Python versions and the CPU model, so an edited source or another
machine's build is never loaded by mistake. `load_built` never compiles: a user call that finds no
build runs the torch twin (headlab.kernels.reference.gathered_ffn) instead, and the caller says so.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["CompiledKernelError", "build", "extension_dir", "extension_path", "load_built", "missing_build_tools",
           "unavailable_reason"]

SOURCE = Path(__file__).resolve().parent / "csrc" / "gathered_ffn.cpp"
FLAGS = ("-O3", "-march=native", "-fopenmp-simd")
_ENV = "HEADLAB_EXTENSIONS"


class CompiledKernelError(RuntimeError):
    """The compiled kernel cannot be built or loaded here (no compiler, no ninja, a failed build)."""


def extension_dir() -> Path:
    """Where built extensions live: $HEADLAB_EXTENSIONS, else ~/.cache/headlab/extensions."""
    return Path(os.environ.get(_ENV) or Path.home() / ".cache" / "headlab" / "extensions")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _name() -> str:
    """The extension's module name: a hash of everything that makes one build differ from another."""
    h = hashlib.sha256(SOURCE.read_bytes())
    for part in (*FLAGS, torch.__version__, sys.version, platform.machine(), _cpu_model()):
        h.update(part.encode())
    return f"headlab_gathered_ffn_{h.hexdigest()[:12]}"


def extension_path() -> Path:
    """The shared library a build of the current source leaves (it may not exist yet)."""
    name = _name()
    return extension_dir() / name / f"{name}.so"


def missing_build_tools() -> str | None:
    """Why this machine cannot build the kernel (no compiler, no ninja), or None when it can."""
    from torch.utils.cpp_extension import is_ninja_available

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not on PATH)"
    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


_LOCK = threading.Lock()
_LOADED: ModuleType | None = None
_REASON: str | None = None


def _import(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(verbose: bool = False) -> ModuleType:
    """Compile the kernel into the cache folder (a no-op when the build is current) and load it."""
    global _LOADED, _REASON
    from torch.utils.cpp_extension import load

    with _LOCK:
        if _LOADED is not None:
            return _LOADED
        missing = missing_build_tools()
        if missing:
            _REASON = missing
            raise CompiledKernelError(missing)
        name = _name()
        folder = extension_dir() / name
        folder.mkdir(parents=True, exist_ok=True)
        try:
            _LOADED = load(name, sources=[str(SOURCE)], extra_cflags=list(FLAGS), build_directory=str(folder),
                           verbose=verbose)
        except (RuntimeError, OSError, ImportError) as e:  # a failed compile or link
            _REASON = f"the build failed ({str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__})"
            raise CompiledKernelError(_REASON) from e
        _REASON = None
        return _LOADED


def load_built() -> ModuleType | None:
    """The built kernel module, or None when there is no current build (this never compiles)."""
    global _LOADED, _REASON
    with _LOCK:
        if _LOADED is not None:
            return _LOADED
        path = extension_path()
        if not path.exists():
            _REASON = f"not built (run `make setup` or `python -m headlab.kernels.compiled`; expected {path})"
            return None
        try:
            _LOADED = _import(path, path.stem)
        except (ImportError, OSError) as e:  # another torch's ABI, a foreign CPU's instructions
            _REASON = f"the build at {path} does not load ({e})"
            return None
        _REASON = None
        return _LOADED


def unavailable_reason() -> str | None:
    """Why the last `load_built` / `build` found no kernel (None when it is loaded)."""
    return None if _LOADED is not None else _REASON


def main() -> None:
    """Build the kernel; on any failure say that the torch fallback will be used, and exit 0."""
    try:
        build(verbose=False)
    except CompiledKernelError as e:
        print(f"compiled decode kernel not built: {e}; sparse decoding will use the torch fallback")
        return
    print(f"compiled decode kernel built: {extension_path()}")


if __name__ == "__main__":
    main()
