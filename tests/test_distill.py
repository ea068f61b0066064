"""Distillation: the objective, what trains, resume, early stop, the data and its cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from headlab.engine.core.mask import PruneMask
from headlab.engine.core.objective import token_logits
from headlab.engine.data.datasets import calibration_texts, read_wikitext, wikitext_calibration
from headlab.engine.export.surgery import prune
from headlab.engine.recovery.distill import (
    DistillConfig,
    DistillData,
    DistillError,
    _hidden_pairs,
    distill,
    distill_data,
    heldout_metric,
    kd_kl,
    layer_map,
    prepare_student_,
    teacher_continuations,
)
from headlab.engine.recovery.quantize import materialize
from headlab.engine.runtime.regions import check_fit_texts
from tests.tiny import save_tiny, tiny_handle

IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 250, 8, 1, 64]])


@pytest.fixture(scope="module")
def data() -> DistillData:
    texts = [t[:160] for t in calibration_texts("wikitext", 10)]
    return DistillData(tuple(texts[:8]), tuple(texts[8:]))


def _mask(handle) -> PruneMask:
    g = handle.geometry
    m = PruneMask.dense(g)
    m.ffn[:, : g.ffn_dim // 2] = 0
    m.heads[0, 0] = 0
    return m


def _student(handle):
    return prune(handle, _mask(handle))


def _config(**kw) -> DistillConfig:
    base = dict(steps=6, batch_size=2, max_length=48, lr=3e-4, warmup=1, eval_every=3, checkpoint_every=2)
    return DistillConfig(**{**base, **kw})


def _weights(student) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in student.model.state_dict().items()}


def test_kl_is_zero_when_student_equals_teacher(handle, data):
    student = prune(handle, PruneMask.dense(handle.geometry))
    assert heldout_metric(handle, student, data.heldout) == pytest.approx(0.0, abs=1e-6)
    if handle.adapter.has_lm_head:
        ids = torch.ones_like(IDS)
        logits = token_logits(handle, IDS, ids)
        assert float(kd_kl(logits, logits.clone(), ids.bool(), 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_kd_kl_is_the_temperature_scaled_kl_divergence():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=gen), torch.randn(2, 5, 11, generator=gen)
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, 3:] = False
    T = 3.0
    ref = F.kl_div(F.log_softmax(s[valid] / T, -1), F.log_softmax(t[valid] / T, -1), log_target=True,
                   reduction="none").sum(-1).mean() * T**2
    assert torch.allclose(kd_kl(s, t, valid, T), ref, atol=1e-6)
    assert float(kd_kl(s, t, valid, T)) > 0


def test_distillation_closes_the_gap_to_the_teacher(handle, data):
    student = _student(handle)
    r = distill(handle, student, data, _config(steps=12, eval_every=4, patience=0))
    assert r.steps_run == 12
    assert r.final_heldout < r.initial_heldout
    assert heldout_metric(handle, student, data.heldout, batch_size=2, max_length=48) == pytest.approx(
        r.best_heldout, rel=1e-4)


def test_teacher_is_never_changed_and_gets_no_gradients(llama_handle, data):
    before = {k: v.clone() for k, v in llama_handle.model.state_dict().items()}
    distill(llama_handle, _student(llama_handle), data, _config(steps=3))
    for k, v in llama_handle.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None and not p.requires_grad for p in llama_handle.model.parameters())


@pytest.mark.parametrize("cfg", [{}, {"bits": 1}, {"mode": "lora", "bits": 2, "hidden_weight": 0.5}])
def test_resume_after_a_stop_continues_the_same_run(llama_handle, data, tmp_path, cfg):
    config = _config(**cfg)
    straight = _student(llama_handle)
    full = distill(llama_handle, straight, data, config)

    calls = iter(range(100))
    part = _student(llama_handle)
    first = distill(llama_handle, part, data, config, out_dir=tmp_path, should_stop=lambda: next(calls) >= 2)
    assert first.interrupted and first.steps_run == 3
    resumed = _student(llama_handle)  # a fresh process would rebuild the student from the mask
    second = distill(llama_handle, resumed, data, config, out_dir=tmp_path, resume=True)

    assert second.steps_run == full.steps_run == config.steps
    assert [r.step for r in second.history] == [r.step for r in full.history]
    assert [r.loss for r in second.history[1:]] == pytest.approx([r.loss for r in full.history[1:]], rel=1e-5)
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_a_checkpoint_is_neither_overwritten_nor_resumed_with_other_settings(llama_handle, data, tmp_path):
    distill(llama_handle, _student(llama_handle), data, _config(steps=2), out_dir=tmp_path)
    with pytest.raises(FileExistsError):
        distill(llama_handle, _student(llama_handle), data, _config(steps=2), out_dir=tmp_path)
    with pytest.raises(DistillError, match="other settings"):
        distill(llama_handle, _student(llama_handle), data, _config(steps=2, lr=5e-4), out_dir=tmp_path, resume=True)
    with pytest.raises(DistillError, match="nothing to resume"):
        distill(llama_handle, _student(llama_handle), data, _config(), out_dir=tmp_path / "new", resume=True)


def test_early_stop_ends_a_run_whose_heldout_metric_stops_improving(llama_handle, data):
    r = distill(llama_handle, _student(llama_handle), data, _config(steps=30, lr=0.0, eval_every=2, patience=2))
    assert r.stopped_early
    assert r.steps_run == 4  # two evaluations (steps 2 and 4) without improvement
    assert r.best_step == 0


def test_a_run_that_only_gets_worse_returns_the_best_weights(llama_handle, data):
    student = _student(llama_handle)
    before = _weights(student)
    r = distill(llama_handle, student, data, _config(steps=4, lr=0.5, grad_clip=0.0, eval_every=2, patience=0))
    assert r.best_step == 0 and r.final_heldout > r.initial_heldout
    after = _weights(student)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_hidden_states_are_matched_to_the_teacher_layers_the_student_came_from(llama_handle, data):
    mask = PruneMask.dense(llama_handle.geometry).with_block(0, "attn", 0.0).with_block(0, "ffn", 0.0)
    student = prune(llama_handle, mask)  # layer 0 dropped: student layer 0 is teacher layer 1
    assert layer_map(student, llama_handle) == [1]
    assert _hidden_pairs(student, llama_handle, _config(hidden_weight=1.0)) == [(1, 2)]
    r = distill(llama_handle, student, data, _config(steps=2, hidden_weight=1.0))
    assert all(rec.hidden > 0 for rec in r.history[1:])


def test_lora_mode_trains_only_the_adapters_and_merges_on_export(llama_handle, data):
    student = _student(llama_handle)
    config = _config(steps=3, mode="lora", lr=1e-2, restore_best=False)
    prepare_student_(student, config)  # adds the adapters; distill finds them in place
    before = {k: v.clone() for k, v in student.model.state_dict().items()}
    distill(llama_handle, student, data, config)
    after = student.model.state_dict()
    changed = {k for k in after if k in before and not torch.equal(after[k], before[k])}
    assert changed and all(k.endswith((".A", ".B")) for k in changed)
    plain = materialize(student.model)
    with torch.no_grad():
        want = student.model(input_ids=IDS).logits
        assert torch.allclose(plain(input_ids=IDS).logits, want, atol=1e-5)


def test_full_mode_keeps_the_token_embeddings_frozen(llama_handle):
    student = _student(llama_handle)
    trainable = prepare_student_(student, _config())
    emb = student.adapter.input_embeddings().weight
    assert not emb.requires_grad and all(p is not emb for p in trainable.values())
    assert any(".mlp." in n for n in trainable)


def test_encoder_distillation_brings_sentence_embeddings_closer(data):
    bert = tiny_handle("bert")
    student = _student(bert)
    r = distill(bert, student, data, _config(steps=8, eval_every=4, patience=0))
    assert r.final_heldout < r.initial_heldout


def test_teacher_continuations_are_generated_once_and_cached(llama_handle, monkeypatch, tmp_path):
    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path))
    prompts = ["Name a colour.", "Count to three."]
    first = teacher_continuations(llama_handle, prompts, max_new_tokens=4)
    assert len(first) == 2 and all(t.startswith(p) for t, p in zip(first, prompts))
    assert len(list((tmp_path / "distill").glob("continuations-*.json"))) == 1

    def no_generation(*a, **k):
        raise AssertionError("the cached continuations must be reused")

    monkeypatch.setattr(llama_handle.model, "generate", no_generation)
    assert teacher_continuations(llama_handle, prompts, max_new_tokens=4) == first
    with pytest.raises(AssertionError):  # other settings are another cache entry
        teacher_continuations(llama_handle, prompts, max_new_tokens=5)


def test_distill_data_mixes_text_and_answers_and_holds_some_out(llama_handle, monkeypatch, tmp_path):
    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path))
    d = distill_data(llama_handle, n_wikitext=6, n_prompts=4, max_new_tokens=3, heldout_fraction=0.25)
    assert d.sources == {"wikitext_end": 6, "teacher_continuations": 4}
    assert len(d.train) + len(d.heldout) == 10 and len(d.heldout) == 2
    assert not set(d.train) & set(d.heldout)


def test_packed_wikitext_is_the_files_running_text_cut_into_windows(llama_handle):
    tok = llama_handle.tokenizer
    d = distill_data(llama_handle, n_wikitext=6, n_prompts=0, pack=64, heldout_fraction=0.25)
    windows = [*d.train, *d.heldout]
    assert d.sources["wikitext_end_windows_64"] == len(windows) > 6
    text = read_wikitext()
    assert all(text.rfind(w) >= 0 for w in windows)  # exact slices of the file
    assert all(len(tok(w, add_special_tokens=False)["input_ids"]) <= 65 for w in windows)
    assert any("\n" in w for w in windows)  # contexts cross paragraph boundaries
    ordered = sorted(windows, key=text.rfind)  # together they are the span, in order, with nothing left out
    tail = text[text.rfind(wikitext_calibration(6)[-1]):]
    assert "".join("".join(ordered).split()) == "".join(tail.split())
    check_fit_texts(llama_handle, windows, "packed")  # after the held-out windows, no protected text
    with pytest.raises(DistillError, match="pack"):
        distill_data(llama_handle, n_wikitext=6, n_prompts=0, pack=1)


@pytest.mark.parametrize("kw,match", [({"steps": 0}, "steps"), ({"bits": 3}, "1 or 2 bits"),
                                      ({"mode": "qlora"}, "mode"), ({"temperature": 0.0}, "temperature")])
def test_bad_settings_are_refused_with_a_clear_message(kw, match):
    with pytest.raises(DistillError, match=match):
        DistillConfig(**kw).check()


def test_the_shared_teacher_cannot_be_the_student(llama_handle, data):
    with pytest.raises(DistillError, match="separate copy"):
        distill(llama_handle, llama_handle, data, _config())
    with pytest.raises(DistillError, match="does not fit"):
        distill(llama_handle, _student(tiny_handle("qwen2")), data, _config())
    with pytest.raises(DistillError, match="held-out"):
        distill(llama_handle, _student(llama_handle), DistillData(("a text",), ()), _config())


def test_history_reports_the_untrained_student_at_step_zero(llama_handle, data):
    seen = []
    distill(llama_handle, _student(llama_handle), data, _config(steps=2), progress=seen.append)
    assert [r.step for r in seen] == [0, 1, 2]
    assert seen[0].heldout is not None and seen[0].loss is None


def _distill_page(tmp_path, monkeypatch):
    """(the app on the Distill page with the tiny Llama and _mask as the session's mask, that model's handle)."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from headlab.ui import keys
    from headlab.ui.models import ModelChoice
    from headlab.ui.session import MaskState

    model_dir, h = save_tiny(tmp_path / "tiny-llama", "llama"), tiny_handle("llama")
    monkeypatch.setenv("HEADLAB_MODEL", str(model_dir))
    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path / "cache"))
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=180)
    at.session_state[keys.MASK] = MaskState(ModelChoice(str(model_dir)).key, _mask(h))
    at.run()
    at.switch_page("pages/distill.py").run()
    return at, h


def test_distill_page_trains_a_student_and_compares_it_with_teacher_and_unrecovered(tmp_path, monkeypatch):
    import time

    at, h = _distill_page(tmp_path, monkeypatch)
    assert not at.exception
    at.number_input(key="distill.steps").set_value(3)
    at.selectbox(key="distill.recipe").set_value("single")
    next(b for b in at.button if b.label == "Start").click()
    at.run()
    job = at.session_state["distill.job"]
    deadline = time.time() + 120
    while not job.finished and time.time() < deadline:
        time.sleep(0.2)
    assert job.finished and job.error is None, job.error
    at.run()
    assert not at.exception
    table = at.dataframe[0].value
    assert list(table["model"]) == ["teacher", "student, no recovery", "student, after 1-bit single-stage"]
    assert (table["perplexity"] > 1).all()
    assert job.result.steps_run == 3
    # by default the WikiText part is running text, in windows as long as the model's context allows
    assert job.pack == job.config.max_length == min(512, h.model.config.max_position_embeddings)
    assert job.config.batch_size * job.config.max_length >= 512


def test_distill_page_sizes_a_full_precision_run_by_minutes(tmp_path, monkeypatch):
    import time

    at, h = _distill_page(tmp_path, monkeypatch)
    at.selectbox(key="distill.recipe").set_value("single").run()
    assert at.toggle(key="distill.by_time").disabled  # a budget in minutes sizes full-precision runs only
    at.selectbox(key="distill.recipe").set_value("fp32").run()
    at.toggle(key="distill.by_time").set_value(True).run()
    assert at.number_input(key="distill.steps").disabled and not at.number_input(key="distill.minutes").disabled
    at.number_input(key="distill.minutes").set_value(0.5)
    next(b for b in at.button if b.label == "Start").click()
    at.run()
    assert not at.exception
    job = at.session_state["distill.job"]
    assert job.minutes == 0.5
    deadline = time.time() + 120
    while not job.history[1:] and not job.finished and time.time() < deadline:  # timed and sized, then training
        time.sleep(0.2)
    job.stop()
    while not job.finished and time.time() < deadline:
        time.sleep(0.2)
    assert job.finished and job.error is None, job.error
    sized = job.config.steps  # from the budget; the steps box (60, warm-up 6) only set the fractions
    assert job.history[-1].steps == sized and job.config.warmup == min(sized, round(6 * sized / 60))
    at.run()
    assert not at.exception


def test_distill_page_reconstructs_a_student_of_the_chosen_size(tmp_path, monkeypatch):
    import time
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from headlab.engine.runtime.cost import cost

    model_dir, h = save_tiny(tmp_path / "tiny-llama", "llama"), tiny_handle("llama")
    monkeypatch.setenv("HEADLAB_MODEL", str(model_dir))
    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path / "cache"))
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=180).run()
    at.switch_page("pages/distill.py").run()
    at.radio(key="distill.source").set_value("uniform width, reconstructed (OBS)").run()
    at.radio(key="distill.text").set_value("paragraphs").run()
    at.slider(key="distill.keep").set_value(0.7)
    at.number_input(key="distill.steps").set_value(2)
    next(b for b in at.button if b.label == "Start").click()
    at.run()
    assert not at.exception and not at.error
    job = at.session_state["distill.job"]
    deadline = time.time() + 120
    while not job.finished and time.time() < deadline:
        time.sleep(0.2)
    assert job.finished and job.error is None, job.error
    assert job.mask.has_refit, "the student's kept output weights were re-solved"
    assert (job.pack, job.config.batch_size, job.config.max_length) == (0, 4, 128)
    c = cost(h, job.mask)
    assert abs(c.params_kept / c.params_total - 0.7) < 0.02
    assert len(set(job.mask.heads.sum(dim=1).tolist())) == 1, "the same heads removed in every layer"
