"""Streamlit helpers of the app (the engine never imports these).

For page authors: a page is `pages/<name>.py`; it appears in the app when the file exists
(headlab/ui/pages.py, KNOWN_PAGES gives the known ones a title and icon). The sidebar (model,
device/dtype, calibration set, current mask summary) is drawn by app.py on every page.
What a page needs, one call each:

    from headlab.ui import session
    from headlab.ui.errors import user_errors

    with user_errors():                   # engine USER_ERRORS -> st.error, page stops; no traceback
        handle = session.handle()         # the open model: cached, shared by sessions, never mutate it
        mask = session.mask()             # this session's current PruneMask (dense at first)
        scores = session.scores()         # criterion -> Scores on the sidebar's calibration set (cached)
    session.set_mask(new_mask)            # make a mask current; the sidebar and every page follow
    session.model_choice().key            # a string naming the open model, for your own cache keys
    session.calibration()                 # the calibration set chosen in the sidebar
    session.live_perplexity(mask)         # fast perplexity through this session's prefix cache

Modules: session (the API above), models (model choice + cached loader), scoring (the
calibration choice, its one shared capture pass and the scores derived from it), sidebar,
pages (page registry), keys (every session-state and widget key), errors, figures (plotly
builders), head_grid (the clickable layers x heads grid: its views and how clicks reach the mask),
tables (pandas tables), widgets (clickable head grid, perplexity metrics), compute
(cached attention maps, generations, full evaluations, costs), shared_cache (values computed
once for every session, by headlab.engine.core.jobs background jobs), curves (background perplexity
curves), suggest (the suggest-mask panel), clusters (the Clusters page's pieces), dynamic,
dynamic_panels and dynamic_figures (the Dynamic page's shared results and training job, its
panels, its figures), mask_edit (click edits and mask digests).
"""
