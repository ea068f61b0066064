"""A job's plan, shown before a long job starts: estimated time, memory per device, layout (headlab.engine.runtime.plan).

    plan_notice(handle, model_key, "suggest", JobShape(n_texts=16, max_length=128))

The plan's probe (a warm-up and one timed forward) runs once per model, job and shape in this process.
"""

from __future__ import annotations

import streamlit as st

from headlab.engine.core.handle import ModelHandle
from headlab.engine.runtime.plan import JobPlan, JobShape, plan_job

__all__ = ["plan_notice"]


@st.cache_resource(show_spinner=False, max_entries=32)
def _plan(model_key: str, job: str, shape: JobShape, _handle: ModelHandle) -> JobPlan:
    return plan_job(job, handle=_handle, shape=shape, probe_repeats=1)  # a warm-up and one timed forward


def plan_notice(handle: ModelHandle, model_key: str, job: str, shape: JobShape) -> JobPlan:
    """A collapsed "Plan: about N s, M MiB on cpu" with the whole plan inside."""
    with st.spinner("Timing a few forward passes to plan the job..."):
        plan = _plan(model_key, job, shape, handle)
    with st.expander(f"Plan: {plan.headline()}"):
        st.code("\n".join(plan.lines()), language=None)
    return plan
