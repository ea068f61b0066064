"""Attention: what each head of a layer attends to for your prompt, dense and under the current mask."""

import streamlit as st

from headlab.engine.runtime.attention_maps import prompt_length, token_limit
from headlab.ui import compute, figures, keys, session
from headlab.ui.errors import user_errors

DEFAULT_PROMPT = ("The cat sat on the mat because it was tired. When the dog came in, "
                  "the cat looked at it and went back to sleep.")
VIEWS = {"dense": "dense model", "masked": "with the current mask",
         "both": "both, side by side, and their difference"}

st.title("Attention")
with user_errors():
    handle = session.handle()
    mask = session.mask()
g = handle.geometry
for key, value in ((keys.W_ATTN_PROMPT, DEFAULT_PROMPT), (keys.W_ATTN_LAYER, g.n_layers // 2),
                   (keys.W_ATTN_HEAD, "all"), (keys.W_ATTN_VIEW, "both"), (keys.W_ATTN_BINS, 64),
                   (keys.W_ATTN_REDUCE, "mass"), (keys.W_ATTN_POWER, 0.5)):
    session.widget_default(key, value)
st.session_state[keys.W_ATTN_LAYER] = min(int(st.session_state[keys.W_ATTN_LAYER]), g.n_layers - 1)

prompt = st.text_area("Prompt", key=keys.W_ATTN_PROMPT, height=90)
c1, c2, c3 = st.columns([1, 1, 2])
layer = int(c1.number_input("Layer", 0, g.n_layers - 1, key=keys.W_ATTN_LAYER))
head = c2.selectbox("Head", ["all", *range(g.n_heads)], key=keys.W_ATTN_HEAD,
                    format_func=lambda h: "all heads" if h == "all" else f"head {h}")
view = c3.radio("Show", list(VIEWS), format_func=VIEWS.get, horizontal=True, key=keys.W_ATTN_VIEW)
with user_errors():
    n_tokens, truncated = prompt_length(handle, prompt)
with st.expander("Long inputs and colours", expanded=n_tokens > 64):
    bins = st.slider("Most rows and columns drawn (longer inputs are pooled into bins)", 16, 128, step=8,
                     key=keys.W_ATTN_BINS)
    window = st.session_state.get(keys.W_ATTN_WINDOW)
    if window is None or window[1] > n_tokens or window[0] >= window[1]:
        st.session_state[keys.W_ATTN_WINDOW] = (0, n_tokens)
    start, stop = st.slider("Token window", 0, n_tokens, key=keys.W_ATTN_WINDOW, disabled=n_tokens < 2) \
        if n_tokens > 1 else (0, n_tokens)
    reduce = st.radio("Pooling", ["mass", "max"], horizontal=True, key=keys.W_ATTN_REDUCE,
                      format_func={"mass": "attention mass (rows average, keys sum)",
                                   "max": "strongest link in each bin"}.get)
    power = st.radio("Colours", [0.5, 1.0], horizontal=True, key=keys.W_ATTN_POWER,
                     format_func={0.5: "square root (weak links visible)", 1.0: "linear"}.get)

bar = st.empty()  # progress of a prompt's first forward (later maps reuse every layer's input)


def forward_progress(done: int, total: int) -> None:
    bar.progress(done / max(1, total), text=f"Running the layers before layer {layer} ({done}/{total})")


opts = dict(max_bins=bins, window=None if (start, stop) == (0, n_tokens) else (start, max(1, stop - start)),
            reduce=reduce, progress=forward_progress)
shown = {}
with user_errors():
    key = session.model_choice().key
    if view in ("dense", "both"):
        shown["Dense"] = compute.attention_maps(handle, key, prompt, layer, None, **opts)
    if view in ("masked", "both"):
        shown["With the current mask"] = compute.attention_maps(handle, key, prompt, layer, mask, **opts)
bar.empty()

first = next(iter(shown.values()))
notes = [f"{first.n_tokens} tokens" + (f" (the prompt was cut to the first {token_limit(handle):,})" if truncated else "")]
if first.span != (0, first.n_tokens):
    notes.append(f"window: tokens {first.span[0]}-{first.span[1] - 1}")
if first.pooled:
    notes.append(f"pooled into bins of about {first.bin_size:.1f} tokens (hover for their text)")
pruned_here = [h for h in range(g.n_heads) if float(mask.heads_effective()[layer, h]) == 0]
if pruned_here:
    which = f"head {pruned_here[0]}" if len(pruned_here) == 1 else f"heads {', '.join(map(str, pruned_here))}"
    notes.append(f"pruned in this layer: {which} (a pruned head still computes its map; its output is dropped)")
st.caption(" · ".join(notes))
if view != "dense" and mask == type(mask).dense(g):
    st.info("The current mask keeps every head, so both maps are the same. Switch heads off on the Heads or "
            "Prune page to see how pruning earlier layers changes this one.")

diff = figures.attention_difference(*shown.values()) if len(shown) == 2 else None
if head != "all":  # one head: the two maps side by side, their difference below
    h = int(head)
    for column, (label, m) in zip(st.columns(2), shown.items()):
        with column:
            st.plotly_chart(figures.attention_heatmap(m, h, title=f"Layer {layer} - {label.lower()}, head {h}",
                                                      power=power, max_labels=32), config={"displayModeBar": False})
    if diff is not None:
        left, right = st.columns(2)
        with left:
            st.plotly_chart(figures.attention_heatmap(shown["With the current mask"], h, power=power, max_labels=32,
                                                      title=f"Layer {layer}, head {h}: with the mask minus dense",
                                                      diff=diff[h]), config={"displayModeBar": False})
        right.caption("Red: attention the mask adds; blue: attention it takes away (the same colour scale on both "
                      "sides of 0, square-root spaced like the maps). Hover a cell for its query and key tokens.")
else:  # every head of the layer: each map across the page, so the small maps stay readable
    for label, m in shown.items():
        st.plotly_chart(figures.attention_small_multiples(m, title=f"Layer {layer} - {label.lower()}",
                                                          group_size=g.group_size, power=power,
                                                          cols=min(g.n_heads, 5)), config={"displayModeBar": False})
    if diff is not None:
        st.plotly_chart(figures.attention_small_multiples(
            shown["With the current mask"], title=f"Layer {layer} - with the mask minus dense (red: attention the "
            "mask adds, blue: takes away)", group_size=g.group_size, power=power, cols=min(g.n_heads, 5), diff=diff),
            config={"displayModeBar": False})
if diff is not None and not diff.any():
    st.caption("The difference is zero everywhere: nothing before this layer's attention is pruned.")
