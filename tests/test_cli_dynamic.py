"""`python -m headlab dynamic-*` on a tiny saved Llama: calibrate, train, evaluate, generate, and clear refusals."""

from __future__ import annotations

import json

import pytest

from headlab.engine.cli.common import USER_ERROR_STATUS
from headlab.engine.cli.main import main
from headlab.engine.dynamic import load_thresholds
from headlab.engine.dynamic.ipn import load_ipn
from headlab.engine.models.load import load_model
from tests.tiny import save_tiny, tiny_model

CALIB = ["--calib-window", "32", "--calib-windows", "4"]
PROTOCOL = ["--window", "64", "--stride", "64", "--windows", "2"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dynamic-cli")
    return {"model": save_tiny(root / "tiny-llama"),
            "other": save_tiny(root / "other-llama", model=tiny_model("llama", seed=1)),
            "root": root}


@pytest.fixture(scope="module")
def calibrated(folders):
    """A CATS 40% thresholds folder written by dynamic-calibrate, and its --json record."""
    out, record = folders["root"] / "cats-40", folders["root"] / "cats-40.json"
    assert main(["dynamic-calibrate", "--model", str(folders["model"]), "--rule", "cats", "--target", "0.4", *CALIB,
                 "--out", str(out), "--json", str(record)]) == 0
    return out, json.loads(record.read_text())


@pytest.fixture(scope="module")
def trained(folders):
    """An importance network (with heads) trained for 2 steps by dynamic-train, and its --json record."""
    out, record = folders["root"] / "ipn-50", folders["root"] / "ipn-50.json"
    assert main(["dynamic-train", "--model", str(folders["model"]), "--target", "0.5", "--heads", "--steps", "2",
                 "--batch", "1", *CALIB, "--out", str(out), "--json", str(record)]) == 0
    return out, json.loads(record.read_text())


def test_dynamic_calibrate_writes_thresholds_that_load_for_the_same_model(folders, calibrated):
    out, record = calibrated
    assert (out / "thresholds.safetensors").exists() and (out / "thresholds.json").exists()
    th = load_thresholds(load_model(str(folders["model"])), out)
    assert th.rule == "cats" and th.target == pytest.approx(0.4)
    assert record["thresholds"]["down"] == pytest.approx(th.values["down"].tolist())
    assert record["meta"]["measured_sparsity"] == pytest.approx(0.4, abs=0.01)


def test_dynamic_eval_of_saved_thresholds_reports_perplexity_and_the_sparsity_reached(folders, calibrated, tmp_path,
                                                                                      capsys):
    out, _ = calibrated
    record = tmp_path / "eval.json"
    assert main(["dynamic-eval", "--model", str(folders["model"]), "--load", str(out), *PROTOCOL,
                 "--json", str(record)]) == 0
    printed = capsys.readouterr().out
    assert "dense:" in printed and "dynamic:" in printed and "FFN channels zeroed per layer" in printed
    r = json.loads(record.read_text())
    assert r["method"] == "cats 40%"
    assert r["dynamic"]["n_tokens"] == r["dense"]["n_tokens"] == 126
    assert r["ratio"] == pytest.approx(r["dynamic"]["perplexity"] / r["dense"]["perplexity"])
    assert 0.3 < r["dynamic"]["sparsity"]["ffn"] < 0.5  # calibrated on other text: near, not exactly, 40%
    assert "agreement" not in r  # recall / precision against the oracle are the network's


def test_dynamic_train_writes_a_network_with_its_history(folders, trained):
    out, record = trained
    assert (out / "ipn.safetensors").exists() and (out / "ipn.json").exists()
    ipn = load_ipn(load_model(str(folders["model"])), out)
    assert ipn.heads and ipn.target == pytest.approx(0.5)
    assert [h["step"] for h in record["history"]] == [1, 2]
    assert abs(record["measured_sparsity"] - 0.5) < 0.05
    saved = json.loads((out / "ipn.json").read_text())
    assert saved["meta"]["training"]["steps"] == 2 and len(saved["meta"]["history"]) == 2


def test_dynamic_eval_of_a_network_reports_recall_and_precision_per_layer(folders, trained, tmp_path, capsys):
    out, _ = trained
    record = tmp_path / "eval.json"
    assert main(["dynamic-eval", "--model", str(folders["model"]), "--load", str(out), *PROTOCOL,
                 "--json", str(record)]) == 0
    assert "recall" in capsys.readouterr().out
    rows = json.loads(record.read_text())["agreement"]
    assert [r["layer"] for r in rows] == [0, 1]
    assert all(0.0 <= r["recall"] <= 1.0 and 0.0 <= r["precision"] <= 1.0 for r in rows)
    assert all(r["recall"] > 0.5 for r in rows)  # far above chance (0.5 at 50% kept): it follows the oracle


@pytest.mark.parametrize("method, sparse_decode", [("cats", True), ("teal", False), ("ipn", True)])
def test_dynamic_generate_shows_dense_and_dynamic_text_with_tokens_per_second(folders, tmp_path, capsys, method,
                                                                             sparse_decode):
    record = tmp_path / "gen.json"
    assert main(["dynamic-generate", "The cat sat", "--model", str(folders["model"]), "--method", method,
                 "--target", "0.5", *CALIB, "--max-new-tokens", "6", "--json", str(record)]) == 0
    r = json.loads(record.read_text())
    assert r["sparse_decode"] is sparse_decode
    assert r["dense"]["tokens_per_s"] > 0 and r["dynamic"]["tokens_per_s"] > 0
    assert 0 <= r["same_tokens"] <= 6
    printed = capsys.readouterr().out
    assert f"{method} 50%" in printed and "tokens/s" in printed
    assert ("reads only each token's kept weights" in printed) is sparse_decode
    assert (r["ideal_speedup"] is not None) is sparse_decode and (r["note"] is None) is sparse_decode


def test_dynamic_generate_at_4_bits_decodes_both_sides_with_the_ffn_at_4_bits(folders, tmp_path, capsys):
    record = tmp_path / "gen.json"
    assert main(["dynamic-generate", "The cat sat", "--model", str(folders["model"]), "--method", "ipn",
                 "--target", "0.5", *CALIB, "--max-new-tokens", "6", "--precision", "int4",
                 "--json", str(record)]) == 0
    r = json.loads(record.read_text())
    assert r["precision"] == "int4" and r["sparse_decode"] is True and r["ideal_speedup"] is not None
    printed = capsys.readouterr().out
    assert printed.count("FFN at 4 bits") == 2


def test_loading_thresholds_or_a_network_for_another_model_fails_clearly(folders, calibrated, trained, capsys):
    for out, what in ((calibrated[0], "these thresholds were calibrated for model"),
                      (trained[0], "this importance network was trained for model")):
        assert main(["dynamic-eval", "--model", str(folders["other"]), "--load", str(out), *PROTOCOL]) \
            == USER_ERROR_STATUS
        err = capsys.readouterr().err
        assert f"error: {what} '{folders['model']}'" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["dynamic-eval", "--method", "cats", "--target", "1.5"], "--target is the fraction"),
    (["dynamic-eval"], "say which method"),
    (["dynamic-eval", "--load", ".", "--method", "cats"], "not both"),
    (["dynamic-generate", "hi", "--load", "no/such/folder"], "is not a folder"),
    (["dynamic-train", "--target", "0.5", "--batch", "9", "--out", "x"], "a batch of 9 windows"),
    (["dynamic-generate", "   ", "--method", "cats", *CALIB], "the prompt is empty"),
    (["dynamic-generate", "hi", "--method", "cats", "--precision", "int4", *CALIB], "importance networks only"),
])
def test_bad_input_is_one_clear_line_and_exit_status_2(folders, capsys, argv, message):
    assert main([*argv, "--model", str(folders["model"])]) == USER_ERROR_STATUS
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_empty_folder_is_neither_thresholds_nor_a_network(folders, tmp_path, capsys):
    assert main(["dynamic-eval", "--model", str(folders["model"]), "--load", str(tmp_path), *PROTOCOL]) \
        == USER_ERROR_STATUS
    assert "holds neither calibrated thresholds" in capsys.readouterr().err


def test_dynamic_train_with_lora_saves_the_adapters(folders, tmp_path):
    from headlab.engine.dynamic.ipn import load_ipn
    from headlab.engine.models.load import load_model

    out = tmp_path / "lora"
    assert main(["dynamic-train", "--model", str(folders["model"]), "--target", "0.5", "--steps", "2",
                 "--lora-rank", "2", *CALIB, "--out", str(out)]) == 0
    ipn = load_ipn(load_model(str(folders["model"])), out)
    assert ipn.lora_rank == 2 and float(ipn.lora_b.detach().abs().sum()) > 0
