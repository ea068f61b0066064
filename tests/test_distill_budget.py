"""Sizing a distillation run to a wall-clock budget from the tokens of the batches it will draw."""

from __future__ import annotations

import pytest
import torch

from headlab.engine.recovery.distill import DistillConfig, DistillData
from headlab.engine.recovery.distill.budget import StepTime, fit_step_time, step_tokens, steps_for_budget

SHORT, LONG = "a b", " ".join(["word"] * 200)


@pytest.fixture(scope="module")
def mixed() -> DistillData:
    """Two long texts and six short ones: a batch of one text is long or short by the draw."""
    return DistillData((LONG, LONG, *[SHORT] * 6), (SHORT,))


def test_step_tokens_are_the_padded_batches_the_run_draws(llama_handle, mixed):
    tok = llama_handle.tokenizer
    config = DistillConfig(batch_size=1, max_length=64)
    counts = step_tokens(tok, mixed, config, range(16))  # two epochs of the eight texts
    long_len = len(tok(LONG, truncation=True, max_length=64)["input_ids"])
    short_len = len(tok(SHORT)["input_ids"])
    assert long_len == 64 and short_len < 8
    assert sorted(set(counts)) == [short_len, long_len]
    assert counts[:8].count(long_len) == 2 and counts[8:].count(long_len) == 2  # each epoch draws both long texts
    # a batch of two is padded to its longest text
    pairs = step_tokens(tok, mixed, DistillConfig(batch_size=2, max_length=64), range(4))
    assert all(c in (2 * short_len, 2 * long_len) for c in pairs)
    assert sum(c == 2 * long_len for c in pairs) in (1, 2)


def test_the_step_time_model_recovers_fixed_and_per_token_costs():
    tokens = [64, 5, 64, 5, 5, 64]
    model = fit_step_time([0.5 + 0.01 * t for t in tokens], tokens)
    assert model.fixed_s == pytest.approx(0.5) and model.per_token_s == pytest.approx(0.01)
    # one token count: the mean rate; a fit with a negative term falls back to it too
    same = fit_step_time([1.0, 3.0], [10, 10])
    assert same == StepTime(0.0, 0.2)
    inverted = fit_step_time([3.0, 1.0], [10, 100])  # longer batches faster: no physical slope
    assert inverted.fixed_s == 0.0 and inverted.per_token_s == pytest.approx(4.0 / 110)
    with pytest.raises(ValueError, match="one wall time per step"):
        fit_step_time([1.0], [1, 2])
    with pytest.raises(ValueError, match="positive"):
        fit_step_time([0.0], [3])


def test_the_budget_counts_each_drawn_batch_at_its_own_cost(llama_handle, mixed):
    tok = llama_handle.tokenizer
    config = DistillConfig(batch_size=1, max_length=64)
    model = StepTime(0.1, 0.01)
    costs = [model.predict(t) for t in step_tokens(tok, mixed, config, range(40))]
    budget = sum(costs[:23]) + 0.5 * costs[23]
    assert steps_for_budget(tok, mixed, config, budget, model) == 23
    assert steps_for_budget(tok, mixed, config, 1e-6, model, minimum=5) == 5
    with pytest.raises(ValueError, match="positive"):
        steps_for_budget(tok, mixed, config, 0, model)


def test_the_budget_counts_evaluations_and_checkpoints_where_the_run_does_them(llama_handle, mixed):
    tok = llama_handle.tokenizer
    config = DistillConfig(batch_size=1, max_length=64, eval_every=10, checkpoint_every=4)
    model = StepTime(0.1, 0.01, eval_s=2.0, checkpoint_s=0.5)
    costs = [model.predict(t) for t in step_tokens(tok, mixed, config, range(40))]
    # 23 steps: evaluations after 10 and 20 and the last, checkpoints after 4, 8, ..., 20 and the last
    run23 = sum(costs[:23]) + 3 * 2.0 + 6 * 0.5
    assert steps_for_budget(tok, mixed, config, run23 + 1e-9, model) == 23
    assert steps_for_budget(tok, mixed, config, run23 - 1e-9, model) < 23
    # a run that writes no checkpoints fits more steps in the same time
    assert steps_for_budget(tok, mixed, config, run23, model, checkpoints=False) > 23
    # 20 steps: the last step's evaluation and checkpoint are the periodic ones, counted once
    run20 = sum(costs[:20]) + 2 * 2.0 + 5 * 0.5
    assert steps_for_budget(tok, mixed, config, run20 + 1e-9, model) == 20


def test_a_probe_times_real_steps_and_leaves_the_teacher_alone(llama_handle, mixed):
    from headlab.engine.core.mask import PruneMask
    from headlab.engine.recovery.distill.budget import probe_step_time

    before = {k: v.clone() for k, v in llama_handle.model.state_dict().items()}
    model = probe_step_time(llama_handle, PruneMask.dense(llama_handle.geometry), mixed,
                            DistillConfig(batch_size=1, max_length=64, warmup=1))
    assert model.per_token_s > 0 and model.fixed_s >= 0 and model.eval_s >= 0 and model.checkpoint_s >= 0
    assert all(torch.equal(before[k], v) for k, v in llama_handle.model.state_dict().items())


def test_a_probe_times_one_evaluation_and_one_checkpoint_in_a_folder_it_removes(llama_handle, mixed, monkeypatch,
                                                                              tmp_path):
    import tempfile
    import time

    from headlab.engine.core.mask import PruneMask
    from headlab.engine.recovery.distill import loop
    from headlab.engine.recovery.distill.budget import probe_step_time

    def slow(fn, seconds):
        def wrapped(*args, **kwargs):
            time.sleep(seconds)
            return fn(*args, **kwargs)
        return wrapped

    # an evaluation that takes 0.4 s longer and a checkpoint write 0.25 s longer than their own work
    monkeypatch.setattr(loop, "heldout_metric", slow(loop.heldout_metric, 0.4))
    monkeypatch.setattr(loop, "_write_checkpoint", slow(loop._write_checkpoint, 0.25))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = probe_step_time(llama_handle, PruneMask.dense(llama_handle.geometry), mixed,
                            DistillConfig(batch_size=1, max_length=64, warmup=1))
    assert 0.4 <= model.eval_s < 1.5 and 0.25 <= model.checkpoint_s < 1.5
    assert model.fixed_s < 0.25  # neither leaked into the steps' fit
    assert list(tmp_path.iterdir()) == []


def test_distill_cli_sizes_the_run_to_minutes_and_resumes_the_same_schedule(tmp_path, monkeypatch, capsys):
    import json

    from headlab.engine.cli.main import main
    from tests.tiny import tiny_model, tiny_tokenizer

    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    base = ["distill", "--model", str(src), "--keep", "0.7", "--batch-size", "2", "--max-length", "32",
            "--n-wikitext", "6", "--n-prompts", "2", "--max-new-tokens", "3", "--n-score-texts", "2", "--no-eval"]
    out = tmp_path / "run"
    assert main([*base, "--minutes", "0.05", "--out", str(out)]) == 0
    budget = json.loads((out / "budget.json").read_text())
    assert budget["minutes"] == 0.05 and budget["steps"] >= 1 and budget["per_token_s"] > 0
    result = json.loads((out / "result.json").read_text())
    # the run trains the length it ends up planned at: the probe's, or its own re-size's once past step 10
    assert result["steps_run"] == result["recipe"]["steps_planned"] >= 1
    if budget["steps"] <= 10:
        assert result["recipe"]["steps_planned"] == budget["steps"]
    assert f"budget: {budget['steps']} steps fit 0.05 minutes" in capsys.readouterr().out
    # a resume keeps the count it was sized to, and refuses another budget
    assert main([*base, "--minutes", "0.05", "--resume", "--out", str(out)]) == 0
    assert json.loads((out / "budget.json").read_text()) == budget
    assert main([*base, "--minutes", "0.1", "--resume", "--out", str(out)]) == 2
    assert "sized to 0.05 minutes" in capsys.readouterr().err
    for bad in (["--minutes", "0"], ["--minutes", "1", "--recipe", "single"]):
        with pytest.raises(SystemExit, match="--minutes takes a positive budget"):
            main([*base, *bad, "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def test_a_recovery_job_sized_by_minutes_trains_the_steps_that_fit(tmp_path, monkeypatch):
    from headlab.engine.core.mask import PruneMask
    from headlab.engine.recovery.recipes import RecoveryJob
    from headlab.engine.runtime.evaluate import PerplexityProtocol
    from tests.tiny import tiny_handle

    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path / "cache"))
    h = tiny_handle("llama")
    mask = PruneMask.dense(h.geometry)
    mask.ffn[:, : h.geometry.ffn_dim // 2] = 0
    config = DistillConfig(steps=100, warmup=10, eval_every=20, batch_size=2, max_length=32, patience=0)
    job = RecoveryJob(h, mask, "fp32", config=config, minutes=0.02, n_wikitext=4, n_prompts=2, max_new_tokens=3,
                      n_heldout=4, protocol=PerplexityProtocol(window=32, stride=32, n_windows=2))
    job.run()
    assert job.error is None, job.error
    steps = job.config.steps
    assert job.result.steps_run == job.result.steps_planned and steps >= 1
    assert job.config.warmup == min(steps, round(10 * steps / 100))  # the same fractions of the steps
    assert job.config.eval_every == max(1, round(20 * steps / 100))
    for bad in (dict(minutes=0.0), dict(minutes=1.0, recipe="single"), dict(minutes=1.0, resume=True)):
        with pytest.raises(ValueError, match="sizes a new full-precision run"):
            RecoveryJob(h, mask, **{"recipe": "fp32", "config": config, **bad})


# --- a run sized again from its own steps -------------------------------------------------------------------------

def _history(tok, data, config, true: StepTime, steps: int, *, slow: dict[int, float] | None = None):
    """StepRecords of a run whose step i took `true`'s time for its batch (plus `slow[i]`): what the loop records."""
    from headlab.engine.recovery.distill.checkpoint import StepRecord

    tokens = step_tokens(tok, data, config, range(steps))
    out, t = [StepRecord(0, config.steps, None, None, None, 0.0, 1.0, 0.0)], 0.0
    for i in range(1, steps + 1):
        t += true.predict(tokens[i - 1]) + (slow or {}).get(i, 0.0)
        held = 1.0 if i % config.eval_every == 0 else None
        out.append(StepRecord(i, config.steps, 1.0, 1.0, 0.0, 1e-4, held, t))
    return out


def test_a_run_is_re_sized_from_its_own_steps_at_one_point(llama_handle, mixed):
    from headlab.engine.recovery.distill.budget import Rebudget

    tok = llama_handle.tokenizer
    config = DistillConfig(steps=100, batch_size=1, max_length=64, eval_every=7, checkpoint_every=5)
    probe = StepTime(0.3, 0.02, eval_s=1.0, checkpoint_s=0.4)  # the probe said slower than the run goes
    true = StepTime(0.1, 0.01)
    budget = 60.0
    r = Rebudget(tok, mixed, budget, probe)
    at = r.at(config.steps)
    assert at == 20  # a fifth of 100
    # the later half's steps carrying an evaluation (14) or a checkpoint write (after 10 and 15: steps 11 and 16)
    # are slow; they are left out
    history = _history(tok, mixed, config, true, at, slow={11: 0.4, 14: 1.0, 16: 0.4})
    assert r(history[:-1], config) is None  # not yet
    steps = r(history, config)
    assert r.refit.fixed_s == pytest.approx(0.1) and r.refit.per_token_s == pytest.approx(0.01)
    assert (r.refit.eval_s, r.refit.checkpoint_s) == (1.0, 0.4)  # the probe's
    # the length: what is left of the budget after step 20, filled at the run's own rate
    assert steps == steps_for_budget(tok, mixed, config, budget, r.refit, start=at, spent=history[-1].elapsed_s)
    assert steps > steps_for_budget(tok, mixed, config, budget, probe)  # the probe had under-sized it
    # a budget's own clock (a benchmark's evaluations left out) is what the remaining time is counted on
    shifted = Rebudget(tok, mixed, budget, probe, clock=lambda rec: rec.elapsed_s + 5.0)
    assert shifted(history, config) < steps
    # too few clean steps: the length stays
    tiny = DistillConfig(steps=100, batch_size=1, max_length=64, eval_every=1, checkpoint_every=5)
    assert Rebudget(tok, mixed, budget, probe)(_history(tok, mixed, tiny, true, at), tiny) == tiny.steps
    with pytest.raises(ValueError, match="fraction"):
        Rebudget(tok, mixed, budget, probe, fraction=1.0)


def replace_steps(config: DistillConfig, steps: int) -> DistillConfig:
    from dataclasses import replace

    return replace(config, steps=steps)


def test_the_loop_takes_the_new_length_and_a_resumed_run_keeps_it(llama_handle, tmp_path):
    from headlab.engine.core.mask import PruneMask
    from headlab.engine.data.datasets import calibration_texts
    from headlab.engine.export.surgery import prune
    from headlab.engine.recovery.distill import DistillError, distill
    from headlab.engine.recovery.distill.loop import _lr

    texts = [t[:160] for t in calibration_texts("wikitext", 10)]
    data = DistillData(tuple(texts[:8]), tuple(texts[8:]))
    mask = PruneMask.dense(llama_handle.geometry)
    mask.ffn[:, : llama_handle.geometry.ffn_dim // 2] = 0
    config = DistillConfig(steps=12, batch_size=2, max_length=48, lr=3e-4, warmup=1, eval_every=4,
                           checkpoint_every=2, patience=0, restore_best=False)
    calls: list[int] = []

    def resize(history, cfg):
        calls.append(history[-1].step)
        return 7 if history[-1].step == 3 else None

    straight = prune(llama_handle, mask)
    full = distill(llama_handle, straight, data, config, resize=resize)
    assert calls == [1, 2, 3]  # asked after every step until it answered
    assert full.steps_run == full.steps_planned == 7
    assert [r.steps for r in full.history] == [12] * 4 + [7] * 4
    assert full.history[-1].heldout is not None  # the new last step evaluates
    for r in full.history[1:]:  # steps 1-3 ran on the 12-step cosine, the rest on the 7-step one
        assert r.lr == pytest.approx(_lr(replace_steps(config, 12 if r.step <= 3 else 7), r.step - 1))

    stops = iter(range(100))
    part = prune(llama_handle, mask)
    first = distill(llama_handle, part, data, config, out_dir=tmp_path, resize=resize,
                    should_stop=lambda: next(stops) >= 4)
    assert first.interrupted and first.steps_run == 5 and first.steps_planned == 7
    resumed = prune(llama_handle, mask)
    second = distill(llama_handle, resumed, data, config, out_dir=tmp_path, resume=True)  # the length asked first
    assert second.steps_run == second.steps_planned == 7
    assert [r.loss for r in second.history[1:]] == pytest.approx([r.loss for r in full.history[1:]], rel=1e-5)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(DistillError, match="single process"):
        from headlab.engine.distributed.world import World

        distill(llama_handle, prune(llama_handle, mask), data, config, resize=resize, world=World(0, 2))
