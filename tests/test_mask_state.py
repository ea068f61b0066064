"""A session's mask under concurrent runs: Streamlit can run two script runs of one session at once.

A click starts a new run in a new thread while the run it replaces may still be in a head grid's callback;
both may apply the same grid state. Each click must still toggle its head exactly once.
"""

from __future__ import annotations

import random
import threading
import time
from types import SimpleNamespace

from headlab.engine.core.mask import PruneMask
from headlab.ui import session
from tests.tiny import tiny_handle


def test_runs_applying_the_same_clicks_at_once_toggle_each_head_once(monkeypatch):
    g = tiny_handle("llama").geometry
    state = session.MaskState("tiny", PruneMask.dense(g))
    monkeypatch.setattr(session, "_mask_state", lambda: state)
    monkeypatch.setattr(session, "handle", lambda: SimpleNamespace(geometry=g))
    read_acks = session.new_clicks

    def slow_new_clicks(*args):  # a thread switch between reading the acknowledgements and writing them
        out = read_acks(*args)
        time.sleep(0.002)
        return out

    monkeypatch.setattr(session, "new_clicks", slow_new_clicks)
    rng = random.Random(0)
    cells = [(rng.randrange(g.n_layers), rng.randrange(g.n_heads)) for _ in range(40)]
    events = [[i + 1, l, h] for i, (l, h) in enumerate(cells)]
    # every run sees a prefix of the clicks (the browser's state grows), in any order, several times over
    states = [{"grid": "g1", "events": events[:n]} for n in range(1, len(events) + 1) for _ in range(3)]
    rng.shuffle(states)
    start = threading.Barrier(4)

    def run(chunk: list[dict]) -> None:
        start.wait()
        for s in chunk:
            session.apply_clicks("heads.grid.entropy", s)

    threads = [threading.Thread(target=run, args=(states[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    session.apply_clicks("heads.grid.entropy", {"grid": "g1", "events": events})  # the last state always arrives
    want: set[tuple[int, int]] = set()
    for c in cells:
        want ^= {c}
    got = {(int(l), int(h)) for l, h in (state.mask.heads_effective() == 0).nonzero().tolist()}
    assert got == want
    assert state.clicks == {"heads.grid.entropy": {"g1": len(events)}}
    assert session.click_acks("heads.grid.entropy") == {"g1": len(events)}
    assert not session.apply_clicks("heads.grid.entropy", {"grid": "g1", "events": events})  # nothing new


def test_a_mask_state_whose_session_state_entry_was_lost_is_found_again(monkeypatch):
    """Streamlit drops a value an overlapping run assigned while it compacted the session state: the next run
    must find the same MaskState (and the clicks applied to it), not make a new dense one."""
    from headlab.ui import keys

    g = tiny_handle("llama").geometry
    fake_state: dict = {}
    active = {"s1", "s2"}
    monkeypatch.setattr(session, "st", SimpleNamespace(session_state=fake_state))
    monkeypatch.setattr(session, "model_choice", lambda: SimpleNamespace(key="tiny"))
    monkeypatch.setattr(session, "handle", lambda: SimpleNamespace(geometry=g))
    monkeypatch.setattr(session, "_BY_SESSION", {})
    monkeypatch.setattr(session, "Runtime", SimpleNamespace(
        instance=lambda: SimpleNamespace(is_active_session=lambda sid: sid in active)))
    sid = {"now": "s1"}
    monkeypatch.setattr(session, "_session_id", lambda: sid["now"])

    first = session._mask_state()
    assert session.apply_clicks("prune.grid", {"grid": "g1", "events": [[1, 0, 1]]})
    fake_state.clear()  # the entry lost by an overlapping run's compaction
    again = session._mask_state()
    assert again is first and fake_state[keys.MASK] is first
    assert float(session.mask().heads[0, 1]) == 0.0 and session.mask_version() == first.version == 1
    assert not session.apply_clicks("prune.grid", {"grid": "g1", "events": [[1, 0, 1]]})  # applied once

    fake_state.clear()  # another session (another tab) gets its own, dense
    sid["now"] = "s2"
    other = session._mask_state()
    assert other is not first and float(other.mask.heads[0, 1]) == 1.0
    active.discard("s1")  # the first tab closed: its state is dropped when the next session starts
    fake_state.clear()
    sid["now"] = "s3"
    session._mask_state()
    assert set(session._BY_SESSION) == {"s2", "s3"}
