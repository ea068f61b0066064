"""The wheel carries what a checkout keeps at the repository root (everything else is in pyproject.toml).

An installed HeadLab has no checkout beside it, so `build_py` copies into the built packages:
- the app's scripts (app.py, pages/, .streamlit/config.toml and the benchmark tables its Dynamic page
  plots) to headlab/_app/, where `headlab app` finds them (headlab/app.py); they are files that
  Streamlit runs, not modules, and import their helpers from `headlab.ui`: the wheel's only top-level
  import name is `headlab`;
- the shipped texts (data/) to headlab/engine/data/shipped/, which headlab/engine/data/datasets.py reads first.
An editable install (`make setup`) copies nothing: the checkout's own files are used in place.
MANIFEST.in lists the same files for a source distribution.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
COPIES = (  # (folder of the repository, glob patterns in it, destination inside the built packages)
    (".", ("app.py", "pages/*.py", ".streamlit/config.toml",
           "bench/results/dynamic.csv", "bench/results/dynamic_decode.csv"), "headlab/_app"),
    ("data", ("README.md", "wikitext-2-raw-test.txt", "prompts/*.jsonl"), "headlab/engine/data/shipped"),
)


class build_py_with_root_files(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for folder, patterns, dest in COPIES:
            for pattern in patterns:
                sources = sorted(p for p in (ROOT / folder).glob(pattern) if p.is_file())
                if not sources:
                    raise FileNotFoundError(f"nothing matches {folder}/{pattern} under {ROOT}: the wheel would lack it")
                for src in sources:
                    target = Path(self.build_lib) / dest / src.relative_to(ROOT / folder)
                    self.mkpath(str(target.parent))
                    self.copy_file(str(src), str(target))


setup(cmdclass={"build_py": build_py_with_root_files})
