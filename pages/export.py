"""Export: write the current mask as a genuinely smaller checkpoint (or first reach a size by width or depth)."""

from pathlib import Path

import streamlit as st

from headlab.engine.data.datasets import calibration_texts
from headlab.engine.export.deploy import EXPORT_TYPES, GgufExportResult, export_gguf
from headlab.engine.export.write import LAYOUTS, export, preview, zip_folder
from headlab.engine.importance.depth import DEPTH_CRITERIA
from headlab.engine.pruning.size_target import reach_size
from headlab.ui import keys, session
from headlab.ui.errors import user_errors

ROUTE_CRITERIA = {"depth": DEPTH_CRITERIA,
                  "width": ("gradient", "magnitude", "activation")}
LAYOUT_HELP = ("auto: a standard config when every layer has the same sizes, else per-layer sizes; "
               "uniform: refuse unless plain transformers can load it; per_layer: always record per-layer sizes")
ZIP_LIMIT = 2 * 2**30
FORMATS = {"Hugging Face folder": "hf", "GGUF for llama.cpp / Ollama": "gguf"}

st.title("Export")
with user_errors():
    handle = session.handle()
    mask = session.mask()

with st.expander("Reach a parameter count first (replaces the current mask)"):
    c1, c2, c3, c4 = st.columns([1.2, 1, 1.2, 1], vertical_alignment="bottom")
    keep = c1.slider("Parameters to keep", 0.5, 0.95, 0.8, 0.05, key=keys.W_EXPORT_KEEP)
    route = c2.radio("Route", ("depth", "width"), horizontal=True, key=keys.W_EXPORT_ROUTE,
                     help="depth: drop whole layers; width: fewer heads and FFN channels in every layer")
    criterion = c3.selectbox("Criterion", ROUTE_CRITERIA[route], key=f"{keys.W_EXPORT_CRITERION}.{route}")
    if c4.button("Compute mask", width="stretch"):
        with user_errors(), st.spinner(f"Scoring {route} units with {criterion}..."):
            cal = session.calibration()
            texts = calibration_texts(cal.name, cal.n_texts)
            r = reach_size(handle, keep, route=route, criterion=criterion, texts=texts)
            session.set_mask(r.mask)
            st.success(r.describe())
            mask = r.mask

layout = st.radio("Config layout", LAYOUTS, horizontal=True, key=keys.W_EXPORT_LAYOUT, help=LAYOUT_HELP)
with user_errors():
    pv = preview(handle, mask, layout)
m1, m2, m3, m4 = st.columns(4)
m1.metric("Parameters", f"{pv.params_after / 1e6:.2f} M", f"{-100 * pv.removed_fraction:.1f}%", delta_color="inverse")
m2.metric("Before", f"{pv.params_before / 1e6:.2f} M")
m3.metric("Size on disk (about)", f"{pv.bytes_estimate / 2**20:.0f} MiB")
m4.metric("Layout", pv.layout.replace("_", "-"))
if pv.why_not_uniform:
    st.caption(f"Per-layer sizes are needed because {pv.why_not_uniform}. The folder loads with "
               "`headlab.engine.models.load.load_pruned(folder)`; docs/export.md shows how to load it without HeadLab.")
if pv.plan.notes:
    with st.expander(f"What surgery keeps and why ({len(pv.plan.notes)} notes)"):
        st.text("\n".join(pv.plan.notes))

default_dir = Path.home() / "headlab-exports" / f"{Path(handle.name).name}-{100 * (1 - pv.removed_fraction):.0f}pct"
folder = st.text_input("Folder to write (a new or empty folder)", str(default_dir), key=keys.W_EXPORT_FOLDER)
o1, o2 = st.columns(2)
overwrite = o1.checkbox("Replace it if it is not empty", key=keys.W_EXPORT_OVERWRITE)
evaluate = o2.checkbox("Measure perplexity before / after (12 windows x 512 tokens)", value=handle.is_causal_lm,
                       disabled=not handle.is_causal_lm, key=keys.W_EXPORT_EVALUATE)
f1, f2 = st.columns([2, 1])
fmt = FORMATS[f1.radio("Format", FORMATS, horizontal=True, key=keys.W_EXPORT_FORMAT,
                       help="GGUF: one file llama.cpp, Ollama and LM Studio run (Llama family, per-layer sizes as "
                            "llama.cpp's deci architecture; Gemma 3 with one size for all layers, as its gemma3), "
                            "with an Ollama Modelfile beside it")]
gguf_type = f2.selectbox("GGUF type", EXPORT_TYPES, index=EXPORT_TYPES.index("f16"),
                         key=keys.W_EXPORT_GGUF_TYPE, disabled=fmt != "gguf",
                         help="K-quants (Q4_K_M, ...) are made from an f16 file by llama.cpp's llama-quantize "
                              "(`make llama-cpp` builds it)")
if st.button("Export", type="primary"):
    with user_errors(), st.status("Exporting...", expanded=True) as status:
        stage = lambda msg: status.write(msg)  # noqa: E731
        st.session_state[keys.EXPORT_RESULT] = (
            export_gguf(handle, mask, folder, gguf_type, overwrite=overwrite, evaluate=evaluate, stage=stage)
            if fmt == "gguf" else
            export(handle, mask, folder, layout=layout, overwrite=overwrite, evaluate=evaluate, stage=stage))
        status.update(label="Exported", state="complete", expanded=False)

result = st.session_state.get(keys.EXPORT_RESULT)
if isinstance(result, GgufExportResult):
    g = result.gguf
    st.success(f"Wrote {g.path} ({g.bytes / 2**20:.1f} MiB, llama.cpp architecture `{g.arch}`, {g.out_type}): "
               f"{result.params_before:,} -> {result.params_after:,} parameters"
               + (f", {g.extra_params:,} added for llama.cpp (duplicated K/V heads, zero query heads, stand-in "
                  "FFNs)"
                  if g.extra_params else "") + ".")
    if g.fallbacks:
        st.caption(f"Kept at F16 (rows not whole quantisation blocks): {', '.join(g.fallbacks[:6])}"
                   + (" ..." if len(g.fallbacks) > 6 else ""))
    st.code("\n".join(f"# {what}\n{command}" for what, command in result.manifest["run"].items()), language="bash")
elif result is not None:
    man = result.manifest
    st.success(f"Wrote {result.folder} ({result.bytes_on_disk / 2**20:.1f} MiB, {result.layout} layout): "
               f"{result.params_before:,} -> {result.params_after:,} parameters.")
    if man["perplexity"]:
        p = man["perplexity"]
        st.write(f"Perplexity {p['before']['perplexity']:.2f} -> {p['after']['perplexity']:.2f} "
                 f"({p['ratio']:.2f}x) on {p['protocol']}")
    st.caption(f"Pruned vs masked logits: max |difference| {man['parity']['max_abs_logit_diff']:.1e} "
               f"(logits up to {man['parity']['max_abs_logit']:.0f}).")
    st.code(f"folder = {str(result.folder)!r}\n{result.load_hint}", language="python")
    if result.bytes_on_disk > ZIP_LIMIT:
        st.info(f"The folder is over {ZIP_LIMIT / 2**30:.0f} GiB: copy it from {result.folder}.")
    elif st.button("Prepare a zip to download"):
        with st.spinner("Zipping..."):
            path = zip_folder(result.folder)
        st.download_button(f"Download {path.name}", path.read_bytes(), file_name=path.name,
                           mime="application/zip", type="primary")
