"""llama.cpp's own tools, to check a GGUF export against the real client and to time it there.

The source comes from the pinned `llama-cpp-python` sdist on the package index (its vendor/llama.cpp):
`build_tools()` downloads it once, builds llama-perplexity, llama-bench, llama-quantize and
llama-tokenize with CMake + Ninja into ~/.cache/headlab/llama.cpp (about 10 minutes on 2 cores),
and later calls find them there. `HEADLAB_LLAMA_CPP=/path/to/bin` points to a build of your own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Callable

from headlab.engine.models.load import cache_dir

__all__ = ["K_QUANTS", "LLAMA_CPP_PYTHON", "TOOLS", "LlamaCppError", "LlamaCppMissing", "bench", "bos_id", "build_tools",
           "find_tools", "perplexity", "quantize", "tokenize"]

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendor/llama.cpp is built
TOOLS = ("llama-perplexity", "llama-bench", "llama-quantize", "llama-tokenize")
ENV = "HEADLAB_LLAMA_CPP"
K_QUANTS = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K")  # made by llama-quantize from an f16 file


class LlamaCppError(RuntimeError):
    """A llama.cpp tool failed or printed nothing usable (its output is in the message)."""


class LlamaCppMissing(LlamaCppError, FileNotFoundError):
    """llama.cpp's tools are not built, or cannot be built here; the message says how to get them."""


def _root() -> Path:
    return cache_dir() / "llama.cpp"


def _bin_dir() -> Path:
    return Path(os.environ[ENV]) if os.environ.get(ENV) else _root() / f"build-{LLAMA_CPP_PYTHON}" / "bin"


def find_tools() -> dict[str, Path]:
    """Tool name -> executable; LlamaCppError naming what is missing and how to get it."""
    found = {name: _bin_dir() / name for name in TOOLS}
    missing = [name for name, path in found.items() if not os.access(path, os.X_OK)]
    if missing:
        raise LlamaCppMissing(f"llama.cpp tools {missing} are not in {_bin_dir()}: run `make llama-cpp` (builds them "
                            f"from llama-cpp-python {LLAMA_CPP_PYTHON}'s source, ~10 min) or set {ENV} to a folder "
                            "holding a llama.cpp build's binaries")
    return found


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise LlamaCppError(f"`{' '.join(map(str, cmd))}` failed ({done.returncode}):\n"
                            f"{(done.stdout + done.stderr)[-3000:]}")
    return done


def build_tools(progress: Callable[[str], None] = print, jobs: int = 2) -> dict[str, Path]:
    """Download the pinned sdist and build the tools into the cache (nothing to do when they are there)."""
    try:
        return find_tools()
    except LlamaCppError:
        if os.environ.get(ENV):
            raise
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            raise LlamaCppMissing(f"building llama.cpp needs `{tool}` (apt-get install {tool.replace('ninja', 'ninja-build')})")
    root = _root()
    root.mkdir(parents=True, exist_ok=True)
    src = root / f"src-{LLAMA_CPP_PYTHON}"
    if not (src / "CMakeLists.txt").exists():
        progress(f"downloading llama-cpp-python {LLAMA_CPP_PYTHON}'s source")
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp,
                  f"llama-cpp-python=={LLAMA_CPP_PYTHON}"])
            (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
            with tarfile.open(sdist) as tar:
                prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
                members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
                for m in members:
                    m.name = m.name[len(prefix):]
                tar.extractall(Path(tmp) / "llama.cpp", members=[m for m in members if m.name], filter="data")
            os.replace(Path(tmp) / "llama.cpp", src)
    build = root / f"build-{LLAMA_CPP_PYTHON}"
    progress(f"building {', '.join(TOOLS)} in {build} (about 10 minutes on 2 cores)")
    _run(["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
          "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"])
    _run(["cmake", "--build", str(build), "-j", str(jobs), "--target", *TOOLS])
    return find_tools()


def tokenize(gguf: str | os.PathLike, text_file: str | os.PathLike) -> list[int]:
    """The token ids llama.cpp reads `text_file` as (with BOS first when the vocabulary adds one)."""
    done = _run([str(find_tools()["llama-tokenize"]), "-m", str(gguf), "-f", str(text_file), "--ids",
                 "--log-disable"])
    match = re.search(r"\[([0-9,\s]*)\]\s*$", done.stdout)
    if match is None:
        raise LlamaCppError(f"llama-tokenize printed no id list: {done.stdout[-500:]}")
    return [int(t) for t in match.group(1).replace(",", " ").split()]


def bos_id(gguf_file: str | os.PathLike) -> int | None:
    """The BOS id llama-perplexity puts first in every chunk, or None where the vocabulary adds no BOS."""
    import gguf as gguf_py

    fields = gguf_py.GGUFReader(gguf_file).fields
    adds = fields.get("tokenizer.ggml.add_bos_token")
    bos = fields.get("tokenizer.ggml.bos_token_id")
    return int(bos.contents()) if adds is not None and bos is not None and bool(adds.contents()) else None


def perplexity(gguf: str | os.PathLike, text_file: str | os.PathLike, n_ctx: int, chunks: int | None = None,
               threads: int = 2) -> float:
    """llama-perplexity's final estimate (second half of each n_ctx chunk scored)."""
    cmd = [str(find_tools()["llama-perplexity"]), "-m", str(gguf), "-f", str(text_file), "-c", str(n_ctx),
           "-b", str(n_ctx), "-t", str(threads)]
    if chunks is not None:
        cmd += ["--chunks", str(chunks)]
    # llama-perplexity logs through an asynchronous logger that it does not flush before exiting
    # (tools/perplexity/perplexity.cpp): now and then its last lines are lost. The running estimate after
    # the last chunk ("[N]ppl,") is the final one; a run that lost both is repeated.
    for _ in range(8):
        done = _run(cmd)
        out = done.stdout + done.stderr
        match = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
        if match is not None:
            return float(match.group(1))
        running = dict(re.findall(r"\[(\d+)\]([0-9.]+),", out))
        n = re.search(r"calculating perplexity over (\d+) chunks", out)
        if n is not None and n.group(1) in running:
            return float(running[n.group(1)])
    raise LlamaCppError(f"llama-perplexity printed no final estimate in 8 runs: {out[-1500:]}")


def bench(gguf: str | os.PathLike, *, prompt: int = 512, generate: int = 128, threads: int = 1,
          repetitions: int = 3) -> dict[str, float]:
    """llama-bench's tokens/s: {"prompt": prompt processing, "generate": generation}."""
    done = _run([str(find_tools()["llama-bench"]), "-m", str(gguf), "-p", str(prompt), "-n", str(generate),
                 "-t", str(threads), "-r", str(repetitions), "-o", "json"])
    rows = json.loads(done.stdout)
    out = {}
    for row in rows:
        key = "prompt" if row.get("n_prompt", 0) and not row.get("n_gen", 0) else "generate"
        out[key] = float(row["avg_ts"])
    return out


def quantize(src: str | os.PathLike, dst: str | os.PathLike, qtype: str = "Q4_K_M") -> Path:
    """llama-quantize `src` (an f16 or f32 GGUF) into `dst` of type `qtype`."""
    _run([str(find_tools()["llama-quantize"]), str(src), str(dst), qtype])
    return Path(dst)
