"""bench/bench_dynamic.py's bookkeeping, on a tiny Llama: cache folders and rows, text disjointness, CSV columns."""

from __future__ import annotations

import pytest

from bench.bench_dynamic import Rows, network_folder
from headlab.engine.dynamic import calibration_ids
from headlab.engine.dynamic.ipn import IPNConfig
from tests.tiny import tiny_handle


@pytest.fixture(scope="module")
def llama():
    return tiny_handle("llama")


@pytest.fixture(scope="module")
def ids(llama):
    return calibration_ids(llama, window=64, n_windows=4)


def test_a_network_of_other_steps_gets_another_folder(llama, ids, tmp_path):
    cfg = IPNConfig(target=0.5, steps=100, n_windows=4, window=64)
    folder = network_folder(tmp_path, llama, cfg, ids)
    assert folder == network_folder(tmp_path, llama, IPNConfig(target=0.5, steps=100, n_windows=4, window=64), ids)
    assert network_folder(tmp_path, llama, IPNConfig(target=0.5, steps=50, n_windows=4, window=64), ids) != folder
    assert network_folder(tmp_path, llama, IPNConfig(target=0.5, steps=100, n_windows=4, window=64, lr=0.02),
                          ids) != folder


def test_a_row_measured_with_other_settings_is_measured_again(tmp_path):
    rows = Rows(tmp_path / "rows.json", fresh=False)
    made = []
    rows.get("ipn@0.5", lambda: made.append(1) or {"ppl_main": 1.0}, {"network": "a"})
    rows.get("ipn@0.5", lambda: made.append(2) or {"ppl_main": 2.0}, {"network": "a"})
    assert made == [1]
    again = Rows(tmp_path / "rows.json", fresh=False)  # from disk, as a rerun reads it
    row = again.get("ipn@0.5", lambda: made.append(3) or {"ppl_main": 3.0}, {"network": "b"})
    assert made == [1, 3] and row["ppl_main"] == 3.0 and row["stamp"] == {"network": "b"}
