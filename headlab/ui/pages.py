"""The pages of the app: a fixed order for the known ones, and any other file in pages/.

A page appears when its file exists, so a new page needs no edit of app.py: add
`pages/<name>.py` (and, for a custom title or icon, a PageSpec in KNOWN_PAGES).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from headlab.app import app_root

__all__ = ["PageSpec", "KNOWN_PAGES", "APP_ROOT", "available_pages", "navigation"]

APP_ROOT = app_root()  # app.py and pages/: the checkout, or an installed wheel's headlab/_app


@dataclass(frozen=True)
class PageSpec:
    path: str  # relative to the app root
    title: str
    icon: str
    default: bool = False


KNOWN_PAGES: tuple[PageSpec, ...] = (
    PageSpec("pages/heads.py", "Heads", ":material/grid_view:", default=True),
    PageSpec("pages/attention.py", "Attention", ":material/visibility:"),
    PageSpec("pages/prune.py", "Prune", ":material/content_cut:"),
    PageSpec("pages/clusters.py", "Clusters", ":material/scatter_plot:"),
    PageSpec("pages/dynamic.py", "Dynamic", ":material/bolt:"),
    PageSpec("pages/distill.py", "Distill", ":material/school:"),
    PageSpec("pages/export.py", "Export", ":material/download:"),
    PageSpec("pages/diagnostics.py", "Diagnostics", ":material/monitor_heart:"),
)


def available_pages(root: Path = APP_ROOT) -> list[PageSpec]:
    """Known pages whose file exists, in order, then any other pages/*.py alphabetically."""
    pages = [p for p in KNOWN_PAGES if (root / p.path).is_file()]
    known = {p.path for p in KNOWN_PAGES}
    for f in sorted((root / "pages").glob("*.py")):
        rel = f"pages/{f.name}"
        if rel not in known and not f.name.startswith("_"):
            pages.append(PageSpec(rel, f.stem.replace("_", " ").capitalize(), ":material/article:"))
    if pages and not any(p.default for p in pages):
        pages[0] = PageSpec(pages[0].path, pages[0].title, pages[0].icon, default=True)
    return pages


def navigation(root: Path = APP_ROOT):
    """st.navigation over every available page (call once, from app.py)."""
    return st.navigation(
        [st.Page(str(root / p.path), title=p.title, icon=p.icon, default=p.default) for p in available_pages(root)]
    )
