"""HeadLab engine: load a transformer, score its heads, prune with masks, measure, export.

The engine never imports streamlit; everything the app does is a call here.
Import the pieces from their modules (`headlab.engine.models.load`, `headlab.engine.core.mask`, `headlab.engine.core.gates`, ...).
"""

__version__ = "0.1.0"
