"""This session's model, mask and caches: the shared API every page calls.

    from headlab.ui import session
    handle = session.handle()        # the session's model (cached, shared by sessions: never mutate)
    mask = session.mask()            # this session's current PruneMask (dense at first)
    session.set_mask(new_mask)       # replace it; every page and the sidebar summary follow
    session.apply_clicks(key, state) # a head grid's clicks: each toggles its head once, in order
    result = session.live_perplexity(mask)   # fast perplexity via this session's prefix cache
    scores = session.scores()        # criterion -> headlab.engine.importance.criteria.Scores on the calibration set
    calib = session.calibration_data()   # engine Calibration: the texts and their one capture pass (shared)

State lives in st.session_state under the names in headlab/ui/keys.py, so two browser tabs never
see each other's masks or prefix caches. Shared between sessions: the loaded model (never
mutated) and results that are pure functions of their inputs (scores per calibration set;
generations, attention maps and full evaluations keyed by a digest of the mask; curves).
"""

from __future__ import annotations

import threading
from typing import Any

import streamlit as st
from streamlit.runtime import Runtime
from streamlit.runtime.scriptrunner import get_script_run_ctx

from headlab.engine.core.mask import PruneMask
from headlab.engine.importance.criteria import Scores
from headlab.engine.models.load import ModelHandle
from headlab.engine.pruning.strategies import Calibration
from headlab.engine.runtime.evaluate import PerplexityResult
from headlab.engine.runtime.prefix_cache import PrefixCache, PrefixRun
from headlab.ui import keys
from headlab.ui.head_grid import new_clicks
from headlab.ui.models import ModelChoice, default_choice, load_cached
from headlab.ui.scoring import CalibrationChoice, cached_scores, calibration_choice, shared_calibration

__all__ = [
    "MaskState",
    "apply_clicks",
    "calibration",
    "calibration_data",
    "click_acks",
    "handle",
    "last_live_run",
    "live_perplexity",
    "mask",
    "mask_version",
    "model_choice",
    "prefix_cache",
    "scores",
    "set_mask",
    "set_model_choice",
    "toggle",
    "widget_default",
]


class MaskState:
    """A session's mask, the model it was made for (a mask of another model is never applied), a version
    bumped on every change, and the head grids' click acknowledgements: changed in place, under a lock.

    Streamlit can run two script runs of one session at once: a click starts a new run in a new thread
    while the run it replaces may still be inside a grid's callback, and an assignment to st.session_state
    made meanwhile can be lost (seen with fast clicks on a busy 2-core machine: a click's toggle or its
    acknowledgement vanished). So the session state gets one MaskState, by the session's first run, and
    every later change is made inside it.
    """

    def __init__(self, model_key: str, mask: PruneMask):
        self.model_key, self.mask = model_key, mask
        self.version = 0
        self.clicks: dict[str, dict[str, int]] = {}  # grid key -> {grid id: seq of the last click applied}
        self.lock = threading.RLock()


def model_choice() -> ModelChoice:
    """The model this session has open (the default until the sidebar changes it)."""
    return st.session_state.get(keys.MODEL_CHOICE) or default_choice()


def set_model_choice(choice: ModelChoice) -> None:
    """Open another model in this session (its mask starts dense)."""
    st.session_state[keys.MODEL_CHOICE] = choice


def handle() -> ModelHandle:
    """The session's loaded model (shared with other sessions on the same choice; never mutate it)."""
    return load_cached(model_choice())


# Every session's MaskState by session id, the same objects st.session_state holds. Streamlit copies a session's
# new st.session_state values aside and then clears them between runs (SessionState._compact_state), so a value
# assigned by an overlapping run in between is lost. The first runs after a page load overlap (the page's and a
# click's): without this, each made its own MaskState and the clicks applied to the lost one vanished.
_BY_SESSION: dict[str, MaskState] = {}
_BY_SESSION_LOCK = threading.Lock()


def _session_id() -> str | None:
    """The server's id of this session; None without a real server (AppTest mocks one, with the same session id
    for every test: its state stays in each test's st.session_state)."""
    ctx = get_script_run_ctx(suppress_warning=True)
    served = Runtime.exists() and type(Runtime.instance()) is Runtime
    return ctx.session_id if ctx is not None and served else None


def _forget_closed_sessions() -> None:
    """Drop the MaskStates of sessions the server has closed (the caller holds _BY_SESSION_LOCK)."""
    runtime = Runtime.instance()
    for sid in [s for s in _BY_SESSION if not runtime.is_active_session(s)]:
        del _BY_SESSION[sid]


def _mask_state() -> MaskState:
    """This session's MaskState, made dense for the open model (first run, or another model opened)."""
    key = model_choice().key
    g = handle().geometry  # before any lock: the first call loads the model
    state: MaskState | None = st.session_state.get(keys.MASK)
    if state is None:  # the session's first run, or the entry an overlapping run assigned was lost
        sid = _session_id()
        with _BY_SESSION_LOCK:
            state = _BY_SESSION.get(sid) if sid is not None else None
            if state is None:
                state = MaskState(key, PruneMask.dense(g))
                if sid is not None:
                    _forget_closed_sessions()
                    _BY_SESSION[sid] = state
        st.session_state[keys.MASK] = state
    if state.model_key != key:
        with state.lock:
            if state.model_key != key:
                state.model_key, state.mask = key, PruneMask.dense(g)
                state.clicks.clear()
                state.version += 1
    return state


def mask() -> PruneMask:
    """This session's current mask for the open model (dense when none was set)."""
    return _mask_state().mask


def set_mask(new: PruneMask) -> None:
    """Make `new` the session's mask (checked against the model first)."""
    g = handle().geometry
    state = _mask_state()
    with state.lock:
        _put(state, new, g)


def _put(state: MaskState, new: PruneMask, geometry: Any) -> None:
    """The one place a mask changes (the caller holds state.lock): `new`, checked against `geometry`.

    No Streamlit call here: a stopped run raises at its next one, and must not stop half-way.
    """
    new.check(geometry)
    state.mask = new
    state.version += 1


def toggle(cells: list[tuple[int, int]]) -> None:
    """Flip the given (layer, head) cells of the session's mask."""
    if cells:
        g = handle().geometry
        state = _mask_state()
        with state.lock:
            _put(state, state.mask.toggle_heads(cells), g)


def click_acks(grid_key: str) -> dict[str, int]:
    """The head grid `grid_key`'s acknowledgements: {grid id: seq of the last click applied}."""
    state = _mask_state()
    with state.lock:
        return dict(state.clicks.get(grid_key, {}))


def apply_clicks(grid_key: str, clicks: Any) -> bool:
    """Toggle the heads of the clicks in a head grid's `clicks` state not applied yet; whether there were any.

    Each click is applied once, in click order (headlab.ui.head_grid.new_clicks); a click outside the
    model's grid is dropped. Reading the acknowledgements, changing the mask and storing the new
    acknowledgements happen under the mask's lock, so two runs of the session applying the same
    state at once apply each click exactly once.
    """
    g = handle().geometry  # Streamlit may stop a run at any of its calls: none is made below, under the lock
    state = _mask_state()
    with state.lock:
        cells, applied = new_clicks(clicks, state.clicks.get(grid_key, {}))
        if not cells:
            return False
        _put(state, state.mask.toggle_heads([(l, h) for l, h in cells if l < g.n_layers and h < g.n_heads]), g)
        state.clicks[grid_key] = applied
    return True


def mask_version() -> int:
    """A counter bumped on each mask change (widgets that show the mask key on it)."""
    return _mask_state().version


def prefix_cache() -> PrefixCache | None:
    """This session's prefix cache for the open model (None for encoders: no perplexity)."""
    h = handle()
    if not h.is_causal_lm:
        return None
    key = model_choice().key
    entry = st.session_state.get(keys.PREFIX_CACHE)
    if entry is None or entry[0] != key:
        entry = (key, PrefixCache(h))
        st.session_state[keys.PREFIX_CACHE] = entry
    return entry[1]


def live_perplexity(m: PruneMask | None = None) -> PerplexityResult | None:
    """Perplexity under `m` (None = dense) on the short live protocol, through the prefix cache."""
    cache = prefix_cache()
    if cache is None:
        return None
    if len(cache) == 0:
        with st.spinner("Running the model once over the evaluation text (later changes reuse it)..."):
            cache.perplexity(None)  # the dense pass is the root every toggle derives from
    return cache.perplexity(m)


def last_live_run() -> PrefixRun | None:
    """What the last live_perplexity call re-ran (layers, seconds)."""
    cache = prefix_cache()
    return cache.last_run if cache is not None else None


def calibration() -> CalibrationChoice:
    """The calibration set chosen in the sidebar (or the default one)."""
    return calibration_choice()


def calibration_data() -> Calibration:
    """The engine Calibration (texts + their one capture pass) of the open model and calibration set (shared)."""
    return shared_calibration(handle(), model_choice().key, calibration())


def scores() -> dict[str, Scores]:
    """Scores of every criterion the app shows, from calibration_data()'s capture pass (cached)."""
    return cached_scores(handle(), model_choice().key, calibration())


def widget_default(key: str, value: Any) -> None:
    """Give widget `key` its first value (widgets in keys.WIDGETS_TO_KEEP must not pass their own default)."""
    st.session_state.setdefault(key, value)
