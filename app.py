"""HeadLab in the browser: find the least useful attention heads, see what they attend to, prune them live.

    make app        # = python -m streamlit run app.py   (opens the shipped SmolLM2-135M-Instruct)

The server listens on 127.0.0.1 only (.streamlit/config.toml); `HEADLAB_ADDRESS=0.0.0.0 make app`
exposes it on purpose. Models' own code (trust_remote_code) can be allowed from the sidebar only
when the server was started with `-- --allow-remote-code` (headlab/ui/server_options.py).

Pages come from headlab/ui/pages.py (a page appears when its file exists); the sidebar is drawn
here so it shows on every page.
"""

import streamlit as st

from headlab.ui import keys
from headlab.ui.pages import navigation
from headlab.ui.server_options import ICON

st.set_page_config(page_title="HeadLab", page_icon=ICON, layout="wide")
for key in keys.WIDGETS_TO_KEEP:  # keep each page's settings while another page is open
    if key in st.session_state:
        st.session_state[key] = st.session_state[key]
# The menu first, before the engine (torch, transformers) is imported: until the first st.navigation call,
# the browser shows Streamlit's automatic menu of pages/ with raw file names.
page = navigation()

from headlab.ui.sidebar import render_sidebar  # noqa: E402

render_sidebar()
page.run()
