"""HeadLab as an installed tool: the `headlab` command (every `python -m headlab` verb, and `headlab app`).

    pip install .                 # the command, the engine, the kernels and the app's files
    headlab eval --windows 1      # any engine verb, exactly as `python -m headlab eval --windows 1`
    headlab app                   # the browser app on 127.0.0.1:8501, from any folder

The app's files (app.py, pages/, headlab/ui/, .streamlit/config.toml) live at the repository root; a wheel
carries a copy of them in headlab/_app (setup.py), so an installed HeadLab needs no checkout.
"""

__version__ = "0.1.0"  # pyproject.toml's version (tests/test_install.py keeps them equal)
