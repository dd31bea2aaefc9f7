"""The jitted train step and the training loop: learning, frozen base, accumulation, resume, interruption."""

import json
import os
import signal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from comoe_jax import trainer
from comoe_jax.config import ConfigError
from comoe_jax.step import TrainStep, make_optimizer, schedule_values, warmup_cosine


def test_overfitting_one_batch_lowers_the_loss_and_only_adapters_change(tiny_config, setup_step, next_batch):
    cfg = tiny_config(train__steps=40)
    step_fn, state, frozen, data, mesh, rules = setup_step(cfg)
    before = jax.tree.map(np.asarray, state.params)
    frozen_before = jax.tree.map(np.asarray, frozen)
    batch = next_batch(data, cfg, mesh, rules)
    losses = []
    for _ in range(40):
        state, metrics = step_fn(state, frozen, batch)
        losses.append(float(metrics["ce"]))
    assert losses[-1] < 0.6 * losses[0], losses
    for name, value in state.params.items():
        assert not np.allclose(np.asarray(value), before[name]), f"{name} did not train"
    for name, value in frozen.items():
        np.testing.assert_array_equal(np.asarray(value), frozen_before[name])
    # the optimizer has state for adapter leaves only
    leaves = {a.shape for a in jax.tree.leaves(state.opt_state) if a.ndim}
    assert leaves <= {v.shape for v in state.params.values()}


def test_total_loss_is_ce_plus_weighted_terms(tiny_config, setup_step, next_batch):
    cfg = tiny_config(loss__load_balance_weight=0.3)
    step_fn, state, frozen, data, mesh, rules = setup_step(cfg)
    for s in range(3):  # after a few steps B != 0, so the contrastive term is informative
        state, m = step_fn(state, frozen, next_batch(data, cfg, mesh, rules))
    want = m["ce"] + 0.01 * m["contrastive"] + 0.3 * m["load_balance"]
    np.testing.assert_allclose(m["loss"], want, rtol=1e-6)
    assert np.isfinite(m["mi_gap"]) and m["expert_load"].shape == (4, 4)  # 2 layers x (q_proj, down_proj)
    np.testing.assert_allclose(np.asarray(m["expert_load"]).sum(-1), 1.0, rtol=1e-5)


def test_gradient_accumulation_equals_one_large_batch(tiny_config, setup_step, next_batch):
    # Deterministic forward (no dropout, every anchor) so both runs see identical terms.
    base = dict(adapter__dropout=0.0, loss__anchor="all")
    big = tiny_config(train__batch_size=4, **base)
    small = tiny_config(train__batch_size=2, optim__grad_accum_steps=2, **base)
    step_big, state_big, frozen, data, mesh, rules = setup_step(big)
    step_small, state_small, *_ = setup_step(small)
    for s in range(2):
        b = next_batch(data, big, mesh, rules)
        micro = {k: v.reshape(2, 2, -1) for k, v in b.items()}
        state_big, m_big = step_big(state_big, frozen, b)
        state_small, m_small = step_small(state_small, frozen, micro)
        for key in ("loss", "ce", "contrastive", "mi_gap", "grad_norm"):
            np.testing.assert_allclose(m_small[key], m_big[key], rtol=2e-5, err_msg=key)
    for name in state_big.params:
        np.testing.assert_allclose(state_small.params[name], state_big.params[name], rtol=1e-4, atol=1e-6)


def test_monitoring_the_term_does_not_change_training(tiny_config, setup_step, next_batch):
    plain = tiny_config(loss__contrastive_weight=0.0)
    watched = tiny_config(loss__contrastive_weight=0.0, loss__monitor_contrastive=True)
    a, state_a, frozen, data, mesh, rules = setup_step(plain)
    b, state_b, *_ = setup_step(watched)
    for s in range(2):
        batch = next_batch(data, plain, mesh, rules)
        state_a, m_a = a(state_a, frozen, batch)
        state_b, m_b = b(state_b, frozen, batch)
    assert "contrastive" not in m_a and np.isfinite(m_b["contrastive"])
    for name in state_a.params:
        np.testing.assert_allclose(state_a.params[name], state_b.params[name], rtol=1e-6, atol=1e-7)


def _params(result):
    return {k: np.asarray(v) for k, v in result.state.params.items()}


@pytest.mark.parametrize("steps, warmup, peak, end_ratio", [(37, 5, 3e-3, 0.0), (11, 0, 2e-4, 0.25),
                                                          (1, 10, 1e-2, 0.0), (6, 9, 5e-4, 0.1), (250, 17, 7e-5, 1.0)])
def test_the_schedule_is_optax_warmup_cosine(steps, warmup, peak, end_ratio, tiny_config):
    cfg = tiny_config(train__steps=steps, optim__warmup_steps=warmup, optim__learning_rate=peak,
                      optim__end_lr_ratio=end_ratio)
    clipped = min(warmup, steps - 1)  # a run shorter than its warm-up: all but its last step
    want = optax.warmup_cosine_decay_schedule(0.0, peak, clipped, max(steps, 1), peak * end_ratio)
    counts = jnp.arange(-1, steps + 3)  # before, through and past the run
    values = schedule_values(cfg)
    public = make_optimizer(cfg)[1]  # the same curve, its numbers as constants
    for got in (jax.jit(warmup_cosine)(counts, values), warmup_cosine(counts, values), jax.vmap(public)(counts)):
        chex.assert_shape(got, counts.shape)
        chex.assert_type(got, jnp.float32)
        np.testing.assert_allclose(got, jax.vmap(want)(counts), rtol=2e-6, atol=peak * 1e-7)


def test_the_compiled_step_is_the_same_for_any_schedule_and_follows_it(tiny_config, setup_step, next_batch):
    cfg = tiny_config(train__steps=9, optim__warmup_steps=3, optim__learning_rate=4e-3, optim__end_lr_ratio=0.2)
    step_fn, state, frozen, data, mesh, rules = setup_step(cfg)
    other = TrainStep(tiny_config(train__steps=50, optim__learning_rate=1e-4), step_fn.graphdef,
                      step_fn.adapters_template, step_fn.frozen_template, mesh, rules)
    lowered = [s.jitted.lower(*s.abstract_inputs(cfg.data.seq_len)).as_text() for s in (step_fn, other)]
    assert lowered[0] == lowered[1]  # so one compilation (and the persistent cache) serves both
    # the update is optax's AdamW at optax's schedule, step after step
    schedule = optax.warmup_cosine_decay_schedule(0.0, 4e-3, 3, 9, 4e-3 * 0.2)
    o = cfg.optim
    tx = optax.chain(optax.clip_by_global_norm(o.max_grad_norm),
                     optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.adam_eps, weight_decay=o.weight_decay))
    params, opt_state = jax.tree.map(np.asarray, state.params), tx.init(jax.tree.map(np.asarray, state.params))
    for count in range(5):
        batch = next_batch(data, cfg, mesh, rules)
        grads, _ = jax.jit(step_fn.gradients)(state.params, frozen, batch, jax.random.split(
            jax.random.wrap_key_data(state.rng))[1])
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        state, metrics = step_fn(state, frozen, batch)
        np.testing.assert_allclose(metrics["learning_rate"], schedule(count), rtol=2e-6)
        for name, value in params.items():
            np.testing.assert_allclose(state.params[name], value, rtol=1e-4, atol=1e-6, err_msg=f"{name} {count}")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_config):
    return _params(trainer.train(tiny_config(tmp_path_factory.mktemp("straight"))))


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_interrupted_run_resumes_to_the_same_parameters(tmp_path, monkeypatch, straight_run, how, tiny_config):
    real, calls = trainer.next_global_batch, []

    def interrupting(stream, cfg):
        calls.append(1)
        if len(calls) == 4:  # while fetching step 4's batch
            if how == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)  # preemption notice: finish this step, save, stop
        return real(stream, cfg)

    monkeypatch.setattr(trainer, "next_global_batch", interrupting)
    first = trainer.train(tiny_config(tmp_path, train__save_every=100))
    saved = 4 if how == "sigterm" else 3
    assert first.interrupted and int(first.state.step) == saved
    assert trainer.Checkpointer(tmp_path / "run", 3).latest_step() == saved
    from comoe_jax.report import unfinished_warning  # what evaluate.py --run and analyze.py then print

    assert f"stopped at step {saved} of 6 (interrupted?)" in unfinished_warning(tmp_path / "run", 6)
    monkeypatch.setattr(trainer, "next_global_batch", real)
    resumed = trainer.train(tiny_config(tmp_path, train__save_every=100))
    assert int(resumed.state.step) == 6 and not resumed.interrupted
    assert unfinished_warning(tmp_path / "run", 6) is None
    for name, value in straight_run.items():
        np.testing.assert_allclose(_params(resumed)[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


def test_a_wandb_that_cannot_start_stops_the_run_before_the_model_loads(tmp_path, tiny_config, monkeypatch):
    wandb = pytest.importorskip("wandb")

    def no_login(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    loaded = []
    monkeypatch.setattr(wandb, "init", no_login)
    monkeypatch.setattr(trainer, "build_model", lambda *args: loaded.append(args))
    cfg = tiny_config(tmp_path, log__wandb=True)
    with pytest.raises(ConfigError, match=r"log\.wandb=true: Weights & Biases could not start a run \(.*api_key"):
        trainer.train(cfg)
    assert not loaded


def test_end_to_end_run_writes_every_artefact(tmp_path, tiny_config, monkeypatch):
    from comoe_jax.progress import WandbSink

    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    logged = []
    original = WandbSink.log
    monkeypatch.setattr(WandbSink, "log", lambda self, scalars, step: (logged.append((step, scalars)),
                                                                       original(self, scalars, step)))
    cfg = tiny_config(tmp_path, train__steps=8, eval__before_training=True, eval__after_training=True,
                      eval__sources=("mix",), eval__max_per_task=3, eval__mode="label", log__wandb=True)
    cfg.data.train = ("mix", "builtin:add")
    cfg.data.max_examples_per_task, cfg.data.seq_len = 40, 384  # byte tokens: the mix's prompts are long
    trainer.train(cfg)
    run = tmp_path / "run"
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))  # W&B's own offline record, beside the run
    run_id = (run / "wandb_id").read_text()
    assert list((run / "wandb").glob(f"offline-run-*-{run_id}"))  # the id a resumed run continues
    assert [step for step, scalars in logged if "train/loss" in scalars] == list(range(1, 9))
    assert "eval_before/accuracy_average" in logged[0][1] and "eval_after/accuracy_winowhy" in logged[-1][1]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["tflops_per_second"] > 0 for r in rows if "tokens_per_second" in r)
    for name in ("metrics.jsonl", "config.json", "losses.png", "expert_load.png", "mi_gap.png", "workload.png",
                 "representations.png", "routing.json", "eval_before.json", "eval_before.md", "eval_after.json",
                 "eval_after.md", "report.md", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, 6, 8]  # train.keep_checkpoints=3 keeps the last three
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 8
    report = (run / "report.md").read_text()
    assert "| before |" in report and "| after |" in report and "MI(task; selected expert set)" in report
    after = json.loads((run / "eval_after.json").read_text())
    assert set(after["per_task"]) == {"social_iqa", "strategyqa", "math_qa", "winowhy"}
    assert sum(r["total"] for r in after["per_task"].values()) == 12


def test_progress_logs_achieved_flops_and_mfu_against_the_peak(tmp_path, monkeypatch):
    import io

    from comoe_jax import progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    out = io.StringIO()
    p = progress.Progress(4, 0, 2, tmp_path / "m.jsonl", stream=out, flops_per_step=3e12, peak_flops=8e12)
    metrics = {"loss": jnp.float32(1.5), "tokens": jnp.float32(100.0)}
    clock[0] = 4.0
    p.update(1, metrics)  # the first step: 4 s with compilation
    clock[0] = 7.0
    p.update(2, metrics)
    clock[0] = 8.0
    p.update(3, metrics)
    clock[0] = 10.0
    p.update(4, metrics)  # steps 3 and 4 in 3 s
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    np.testing.assert_allclose([rows[0]["tokens_per_second"], rows[1]["tokens_per_second"],
                                rows[3]["tokens_per_second"]], [25.0, 100 / 3, 200 / 3])
    np.testing.assert_allclose([rows[1]["tflops_per_second"], rows[1]["mfu"]], [1.0, 1 / 8])
    np.testing.assert_allclose([rows[3]["tflops_per_second"], rows[3]["mfu"]], [2.0, 0.25])
    assert "MFU 25.0%" in out.getvalue().splitlines()[-1]


def test_validation_during_training_logs_plots_and_keeps_the_best_adapter(tmp_path, tiny_config):
    cfg = tiny_config(tmp_path, eval__every=2, eval__keep_best=True, eval__sources=("builtin:add+antonym",),
                      eval__mode="generate", eval__max_per_task=3, eval__max_new_tokens=4)
    trainer.train(cfg)
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(np.isfinite(r["loss"]) and 0 <= r["accuracy_average"] <= 1 for r in rows)
    assert {"accuracy_add", "accuracy_antonym"} <= set(rows[0])
    assert rows[0]["loss"] > rows[-1]["loss"]  # training on the same tasks lowers the validation loss
    best = json.loads((run / "best.json").read_text())
    assert best["step"] == max(rows, key=lambda r: (r["accuracy_average"], -r["loss"]))["step"]  # ties: lower loss
    assert (run / "best_adapter" / "adapter_model.safetensors").exists() and (run / "validation.png").exists()
    import evaluate

    assert evaluate.main(["--run", str(run), "--adapter", str(run / "best_adapter"), "eval.max_per_task=2"]) == 0
    assert (run / "best_adapter" / "eval_test_generate.json").exists()


def test_response_loss_is_the_mean_response_token_cross_entropy(tiny_config):
    from comoe_jax.data import encode, load_source, render
    from comoe_jax.evaluate import response_loss
    from comoe_jax.loading import build_model, byte_tokenizer

    cfg = tiny_config()
    model, tok = build_model(cfg), byte_tokenizer()
    items = load_source("builtin:add+reverse", "validation")[:5]
    total, count = 0.0, 0
    for ex in items:  # each item alone, float64 log-softmax over the full vocabulary
        ids, is_response, _ = encode(tok, *render(ex, "plain"), seq_len=40)
        logits = np.asarray(model(jnp.asarray(ids[None, :-1], jnp.int32))[0], np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        for t in range(1, len(ids)):
            if is_response[t]:
                total -= logp[t - 1, ids[t]]
                count += 1
    got = response_loss(model, tok, items, template="plain", seq_len=40, batch_size=3)
    np.testing.assert_allclose(got, total / count, rtol=1e-5)


def test_changed_config_is_not_resumed(tmp_path, tiny_config, capsys):
    trainer.train(tiny_config(tmp_path, train__steps=2))
    with pytest.raises(ConfigError, match=r"different config.*adapter\.rank: checkpoint 4, now 8"):
        trainer.train(tiny_config(tmp_path, adapter__rank=8))
    with pytest.raises(ConfigError, match="already holds checkpoints up to step 2; pass train.resume=true"):
        trainer.train(tiny_config(tmp_path, train__resume=False))
    capsys.readouterr()
    extended = trainer.train(tiny_config(tmp_path, train__steps=3))  # more steps is allowed, with a warning
    assert int(extended.state.step) == 3
    assert "warning: train.steps changed from 2 to 3: from step 3 on, the learning rate follows the 3-step " \
        "schedule" in capsys.readouterr().out


def test_a_run_is_not_resumed_over_changed_data_files(tmp_path, tiny_config):
    from comoe_jax.data import DataError

    data = tmp_path / "qa.jsonl"
    rows = [{"question": f"{i} + 1 =", "answer": str(i + 1), "task": "inc"} for i in range(24)]
    data.write_text("\n".join(map(json.dumps, rows)))
    sources = dict(data__train=(f"jsonl:{data}",), eval__sources=(f"jsonl:{data}",))
    trainer.train(tiny_config(tmp_path, train__steps=2, **sources))
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    data.write_text("\n".join(map(json.dumps, rows[:20])))
    with pytest.raises(DataError, match=r"the training data changed since this run was checkpointed \(examples per "
                                        r"task inc: 24 -> 20\): its saved position would continue over other"):
        trainer.train(tiny_config(tmp_path, train__steps=3, **sources))
    data.write_text("\n".join(map(json.dumps, rows[:23] + [rows[23] | {"answer": "99"}])))
    with pytest.raises(DataError, match=r"\(same counts, other contents\)"):
        trainer.train(tiny_config(tmp_path, train__steps=3, **sources))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == saved
    data.write_text("\n".join(map(json.dumps, rows)))  # the data restored: the run goes on
    assert int(trainer.train(tiny_config(tmp_path, train__steps=3, **sources)).state.step) == 3


def _poison(monkeypatch, steps, where="one gradient"):
    """Make the step's gradients (one leaf) or its loss non-finite, inside jit, at the given 0-based steps."""
    real = TrainStep.batch_gradients

    def poisoned(self, state, frozen, batch, key):
        grads, metrics = real(self, state, frozen, batch, key)
        bad = jnp.isin(state.step, jnp.asarray(steps))
        if where in ("one gradient", "overflowing gradients"):  # the loss stays finite
            name = sorted(grads)[0]
            # 1e30 is finite, its square is not: clipping would zero the step, Adam's moment would stay inf
            poison = jnp.nan if where == "one gradient" else jnp.float32(1e30)
            grads = dict(grads, **{name: jnp.where(bad, poison, grads[name])})
        else:
            metrics = dict(metrics, loss=jnp.where(bad, jnp.inf, metrics["loss"]))
        return grads, metrics

    monkeypatch.setattr(TrainStep, "batch_gradients", poisoned)


@pytest.mark.parametrize("where", ["one gradient", "overflowing gradients", "loss"])
def test_a_non_finite_step_is_skipped_whole(monkeypatch, where, tiny_config, setup_step, next_batch):
    _poison(monkeypatch, [1], where)
    cfg = tiny_config()
    step_fn, state, frozen, data, mesh, rules = setup_step(cfg)
    state, m = step_fn(state, frozen, next_batch(data, cfg, mesh, rules))  # step 0: fine
    assert int(m["skipped"]) == 0
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    state, m = step_fn(state, frozen, next_batch(data, cfg, mesh, rules))  # step 1: poisoned
    assert int(m["skipped"]) == 1 and int(state.skipped_total) == 1 and int(state.step) == 2
    after = jax.tree.map(np.asarray, (state.params, state.opt_state))
    jax.tree.map(np.testing.assert_array_equal, after, before)  # parameters and optimizer state unchanged
    state, m = step_fn(state, frozen, next_batch(data, cfg, mesh, rules))  # step 2: trains again
    assert int(m["skipped"]) == 0 and int(state.skipped) == 0
    name = next(n for n in sorted(state.params) if n.endswith("lora_b"))  # A gets no gradient while B = 0
    assert not np.allclose(np.asarray(state.params[name]), before[0][name])


def test_a_run_with_non_finite_steps_continues_with_finite_parameters(tmp_path, monkeypatch, tiny_config):
    _poison(monkeypatch, [1, 3])
    result = trainer.train(tiny_config(tmp_path, train__log_every=1))
    assert int(result.state.step) == 6 and int(result.state.skipped_total) == 2
    assert all(np.isfinite(np.asarray(v)).all() for v in result.state.params.values())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["skipped"]] == [2, 4]
    from comoe_jax.checkpoint import load_adapters

    assert all(np.isfinite(v).all() for v in load_adapters(tmp_path / "run" / "adapter")[0].values())


def test_a_run_that_keeps_diverging_stops_with_exit_code_3_and_finite_checkpoints(tmp_path, monkeypatch, capsys,
                                                                                   tiny_config):
    import train

    _poison(monkeypatch, [3, 4, 5])
    cfg = tiny_config(tmp_path, train__log_every=1, train__max_skipped_steps=2)
    args = ["--config", "configs/tiny.py"] + [f"{k}={v}" for k, v in {
        "model.random_arch": json.dumps(cfg.model.random_arch), "adapter.rank": 4, "data.train": "builtin:add",
        "data.seq_len": 56, "train.batch_size": 4, "train.steps": 6, "train.save_every": 2, "train.log_every": 1,
        "train.max_skipped_steps": 2, "mesh.num_devices": 1, "train.output_dir": tmp_path / "run",
        "eval.before_training": "false", "eval.after_training": "false"}.items()]
    assert train.main(args) == 3
    err = capsys.readouterr().err
    assert "training diverged: 2 consecutive steps up to step 5 had a non-finite loss or gradient" in err
    assert "Traceback" not in err
    ckpt = trainer.Checkpointer(tmp_path / "run", 3)
    assert ckpt.latest_step() == 4  # saved after one skip (its parameters are step 3's); none after the stop
    step, state, _ = ckpt.restore_intact(None)
    assert step == 4 and int(state["skipped"]) == 1
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(state))
    assert not (tmp_path / "run" / "adapter").exists()


def test_bfloat16_base_trains(tiny_config, setup_step, next_batch):
    cfg = tiny_config(model__dtype="bfloat16", model__param_dtype="bfloat16", train__steps=15)
    step_fn, state, frozen, data, mesh, rules = setup_step(cfg)
    assert all(v.dtype == jnp.bfloat16 for v in frozen.values())
    assert all(v.dtype == jnp.float32 for v in state.params.values())
    batch = next_batch(data, cfg, mesh, rules)
    first = None
    for _ in range(15):
        state, m = step_fn(state, frozen, batch)
        first = first or float(m["ce"])
    assert np.isfinite(m["loss"]) and float(m["ce"]) < first


@pytest.mark.parametrize("slots", [16, 2], ids=["gathered", "falls-back"])
def test_the_head_at_supervised_positions_gives_the_full_loss_and_gradients(slots, tiny_config, setup_step,
                                                                              next_batch):
    base = dict(adapter__dropout=0.0, loss__anchor="all")  # deterministic terms
    full = setup_step(tiny_config(train__head_positions=-1, **base))
    part = setup_step(tiny_config(train__head_positions=slots, **base))
    assert full.step.head_positions == 56 and part.step.head_positions == slots
    batch = next_batch(full.data, full.step.cfg, full.mesh, full.rules)
    per_row = np.asarray(batch["loss_mask"]).sum(-1).max()
    assert (per_row <= slots) == (slots == 16)  # the two branches: gathered slots, every position
    key = jax.random.key(0)
    g_full, m_full = jax.jit(full.step.gradients)(full.state.params, full.frozen, batch, key)
    g_part, m_part = jax.jit(part.step.gradients)(part.state.params, part.frozen, batch, key)
    for name in ("loss", "ce", "contrastive"):
        np.testing.assert_allclose(m_part[name], m_full[name], rtol=1e-6, err_msg=name)
    for name in g_full:
        np.testing.assert_allclose(g_part[name], g_full[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_sparse_experts_give_the_dense_step_loss_and_gradients(tiny_config, setup_step, next_batch):
    base = dict(adapter__num_experts=6, loss__num_negatives=2, adapter__dropout=0.1)
    dense = setup_step(tiny_config(adapter__experts="dense", **base))
    sparse = setup_step(tiny_config(adapter__experts="sparse", **base))
    assert dense.step.graphdef != sparse.step.graphdef  # two different computations
    batch = next_batch(dense.data, dense.step.cfg, dense.mesh, dense.rules)
    rng = np.random.default_rng(0)  # B != 0, so every gradient is informative
    state = dense.state.replace(params={k: v + 0.1 * rng.normal(size=v.shape).astype(v.dtype) if "lora_b" in k else v
                                       for k, v in dense.state.params.items()})
    key = jax.random.key(1)
    g_dense, m_dense = jax.jit(dense.step.gradients)(state.params, dense.frozen, batch, key)
    g_sparse, m_sparse = jax.jit(sparse.step.gradients)(state.params, sparse.frozen, batch, key)
    assert all(np.abs(g).max() > 0 for g in g_dense.values())
    for name in ("loss", "ce", "contrastive", "mi_gap", "load_balance", "expert_load"):
        np.testing.assert_allclose(m_sparse[name], m_dense[name], rtol=1e-5, atol=1e-7, err_msg=name)
    for name in g_dense:
        np.testing.assert_allclose(g_sparse[name], g_dense[name], rtol=1e-4, atol=1e-7, err_msg=name)


class _FailingCheckpointer:
    closed = False

    def save(self, *args):
        raise RuntimeError("RESOURCE_EXHAUSTED while saving")

    def latest_step(self):
        return 2

    def wait(self):
        pass

    def close(self):
        self.closed = True


def test_a_failed_final_save_never_hides_the_error_that_stopped_the_run():
    import types

    _final_save = trainer._final_save
    healthy, state, said = types.SimpleNamespace(healthy=True), {"w": jnp.ones(3)}, []
    ckpt = _FailingCheckpointer()
    with pytest.raises(ValueError, match="what stopped the run"):
        try:
            raise ValueError("what stopped the run")
        finally:
            _final_save(ckpt, state, None, {}, healthy, said.append)
    assert said == ["could not save the current state (RuntimeError); checkpoint 2 is the latest good one"]
    assert ckpt.closed
    with pytest.raises(RuntimeError, match="while saving"):  # with nothing else on its way out, the save's own error
        _final_save(_FailingCheckpointer(), state, None, {}, healthy, said.append)
