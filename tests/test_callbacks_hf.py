"""GSAMTrainerCallback with real ``transformers.Trainer`` runs (tiny BERT from a config): what
arrives in the Trainer's TensorBoard event files and an offline W&B run, evaluation,
gradient accumulation, checkpoint resume, exceptions, and the lazy import."""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

tr = pytest.importorskip("transformers")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

import gsam_monitor.callbacks  # noqa: E402
from gsam_monitor import CollectOptions  # noqa: E402
from gsam_monitor._install import install_hint  # noqa: E402
from gsam_monitor.callbacks import GSAMTrainerCallback  # noqa: E402
from gsam_monitor.callbacks.hf import STATE_FILE  # noqa: E402
from tests.reference import gsam_pdet  # noqa: E402
from tests.wandb_records import read_run  # noqa: E402

LAYERS = ("bert.encoder.layer.0", "bert.encoder.layer.1")
SEQ, BATCH = 8, 4


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = tr.BertConfig(
        vocab_size=64,
        num_hidden_layers=2,
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
        hidden_dropout_prob=0.0,  # deterministic: a resumed run sees the same activations
        attention_probs_dropout_prob=0.0,
    )
    return tr.BertForSequenceClassification(config)


def dataset(n: int = 64, seed: int = 0, padded: bool = True) -> list[dict[str, torch.Tensor]]:
    """Fixed-width rows; with ``padded`` each row keeps 4..8 real tokens, the rest is padding."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(1, 64, (SEQ,), generator=g)
        length = int(torch.randint(4, SEQ + 1, (), generator=g)) if padded else SEQ
        mask = (torch.arange(SEQ) < length).long()
        rows.append({"input_ids": ids * mask, "attention_mask": mask, "labels": torch.tensor(i % 2)})
    return rows


def training_args(out: Path, **overrides) -> tr.TrainingArguments:
    options = {
        "output_dir": str(out),
        "max_steps": 6,
        "per_device_train_batch_size": BATCH,
        "per_device_eval_batch_size": 8,
        "logging_steps": 2,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }
    options.update(overrides)
    return tr.TrainingArguments(**options)


class Recorder:
    """Independent hooks: the unpadded training-phase rows of each block, per global step."""

    def __init__(self, model: torch.nn.Module, trainer_state) -> None:
        self.rows: dict[str, dict[int, list[np.ndarray]]] = {name: {} for name in LAYERS}
        self.eval_rows: dict[str, list[np.ndarray]] = {name: [] for name in LAYERS}
        self.state = trainer_state
        self.mask: torch.Tensor | None = None
        modules = dict(model.named_modules())
        self.handles = [model.register_forward_pre_hook(self._capture_mask, with_kwargs=True)]
        self.handles += [modules[name].register_forward_hook(self._hook(name)) for name in LAYERS]

    def _capture_mask(self, module, args, kwargs) -> None:
        self.mask = kwargs.get("attention_mask")

    def _hook(self, name: str):
        def hook(module, args, output) -> None:
            hidden = output[0] if isinstance(output, tuple) else output  # (B, T, d)
            x = hidden.detach().to(torch.float64)[self.mask.bool()].numpy().copy()  # (tokens, d)
            if torch.is_grad_enabled() and module.training:
                self.rows[name].setdefault(int(self.state().global_step), []).append(x)
            else:
                self.eval_rows[name].append(x)

        return hook

    def window(self, layer: str, first_step: int, last_step: int) -> np.ndarray:
        """Rows of optimizer steps ``first_step..last_step`` (1-based, inclusive)."""
        return np.concatenate([x for s in range(first_step - 1, last_step) for x in self.rows[layer].get(s, [])])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def train(trainer: tr.Trainer, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the monitor's every_n_steps < 10 cost warning
        return trainer.train(**kwargs)


def test_trainer_tensorboard_and_wandb_get_train_and_eval_curves(tmp_path: Path, monkeypatch) -> None:
    """logging_steps=2, eval every 3 steps, max_steps=6: train logs at 2, 4, 6 and eval logs at
    3, 6, in the Trainer's own TensorBoard folder and W&B run, at its global step; the values
    equal scipy's on the (unpadded) rows recorded by independent hooks."""
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "gsam-test")
    import wandb

    wandb.teardown()  # W&B reads WANDB_DIR when its process-wide setup starts: restart it after earlier runs
    model = tiny_bert()
    callback = GSAMTrainerCallback(collection=CollectOptions(max_tokens_per_layer=None))
    args = training_args(tmp_path / "out", report_to=["tensorboard", "wandb"], eval_strategy="steps", eval_steps=3)
    trainer = tr.Trainer(model=model, args=args, train_dataset=dataset(), eval_dataset=dataset(16, seed=1),
                         callbacks=[callback])
    recorder = Recorder(model, lambda: trainer.state)
    try:
        train(trainer)
    finally:
        wandb.finish()
    recorder.remove()

    assert callback.monitor.every_n_steps == 2  # followed logging_steps
    assert callback.last_steps == {"train": 6, "eval": 6}
    expected = {layer: gsam_pdet(recorder.window(layer, 5, 6))[0] for layer in LAYERS}
    # The eval window at step 6: the second evaluation's forwards (the first was logged at 3).
    n_eval = {layer: sum(len(x) for x in recorder.eval_rows[layer]) // 2 for layer in LAYERS}
    eval_expected = {layer: gsam_pdet(np.concatenate(recorder.eval_rows[layer][-2:]))[0] for layer in LAYERS}
    for layer in LAYERS:
        assert callback.last_metrics["train"][f"n/{layer}"] == len(recorder.window(layer, 5, 6))
        assert callback.last_metrics["train"][f"gsam/{layer}"] == pytest.approx(expected[layer], rel=1e-9)
        assert callback.last_metrics["eval"][f"n/{layer}/eval"] == n_eval[layer]
        assert callback.last_metrics["eval"][f"gsam/{layer}/eval"] == pytest.approx(eval_expected[layer], rel=1e-9)

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "eval/loss" in tags  # the Trainer's run, not a second one
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1  # and its writer
    for layer in LAYERS:
        for metric in ("gsam", "rank", "effective_rank", "anisotropy", "n"):
            assert [e.step for e in acc.Scalars(f"{metric}/{layer}")] == [2, 4, 6]
            assert [e.step for e in acc.Scalars(f"{metric}/{layer}/eval")] == [3, 6]
        assert acc.Scalars(f"gsam/{layer}")[-1].value == pytest.approx(expected[layer], rel=1e-6)
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6]  # the same x values as the loss

    history, defined = read_run(tmp_path)
    assert ("gsam/*", "train/global_step") in defined  # the Trainer's x-axis, as its own metrics
    train_rows = [h for h in history if f"gsam/{LAYERS[0]}" in h]
    eval_rows = [h for h in history if f"gsam/{LAYERS[0]}/eval" in h]
    assert [h["train/global_step"] for h in train_rows] == [2, 4, 6]
    assert [h["train/global_step"] for h in eval_rows] == [3, 6]
    assert train_rows[-1][f"gsam/{LAYERS[1]}"] == pytest.approx(expected[LAYERS[1]], rel=1e-12)


def test_gradient_accumulation_windows_count_optimizer_steps(tmp_path: Path) -> None:
    seen: list[tuple[int, float]] = []
    callback = GSAMTrainerCallback(
        every_n_steps=2, collection=CollectOptions(max_tokens_per_layer=None, phases="train"),
        sinks=[lambda metrics, step: seen.append((step, metrics[f"n/{LAYERS[0]}"]))],
    )
    args = training_args(tmp_path / "out", max_steps=4, gradient_accumulation_steps=3, logging_steps=1)
    trainer = tr.Trainer(model=tiny_bert(), args=args, train_dataset=dataset(padded=False), callbacks=[callback])
    train(trainer)
    tokens = 2 * 3 * BATCH * SEQ  # 2 optimizer steps x 3 micro-batches x (B x T)
    assert seen == [(2, tokens), (4, tokens)]  # every_n_steps=2 wins over logging_steps=1


def test_resume_from_checkpoint_continues_windows_and_steps(tmp_path: Path) -> None:
    """An uninterrupted run and a run resumed from checkpoint-3 (inside the window 3..4) log the
    same values at steps 4 and 6: the window's first half comes from gsam_monitor_state.pt."""
    out = tmp_path / "out"
    full: list[tuple[int, float, float]] = []

    def sink(into):
        return lambda m, step: into.append((step, m[f"n/{LAYERS[0]}"], m[f"gsam/{LAYERS[0]}"]))

    first = GSAMTrainerCallback(
        collection=CollectOptions(max_tokens_per_layer=None, phases="train"), sinks=[sink(full)]
    )
    args = training_args(out, save_strategy="steps", save_steps=3)
    train(tr.Trainer(model=tiny_bert(), args=args, train_dataset=dataset(), callbacks=[first]))
    assert [s for s, _, _ in full] == [2, 4, 6]
    state = torch.load(out / "checkpoint-3" / STATE_FILE, weights_only=True)
    assert state["step_count"] == 3

    resumed: list[tuple[int, float, float]] = []
    second = GSAMTrainerCallback(
        collection=CollectOptions(max_tokens_per_layer=None, phases="train"), sinks=[sink(resumed)]
    )
    trainer = tr.Trainer(model=tiny_bert(), args=args, train_dataset=dataset(), callbacks=[second])
    train(trainer, resume_from_checkpoint=str(out / "checkpoint-3"))
    assert second.monitor.step_count == 6
    assert [(s, n) for s, n, _ in resumed] == [(s, n) for s, n, _ in full[1:]]
    for (_, _, g_full), (_, _, g_resumed) in zip(full[1:], resumed, strict=True):
        assert g_resumed == pytest.approx(g_full, rel=1e-6)


def _no_stack_walk(*args, **kwargs):
    raise AssertionError("the call stack was read although the callback was attached explicitly")


def test_attach_joins_the_trainer_and_resumes_from_train_arguments_without_the_stack(
    tmp_path: Path, monkeypatch
) -> None:
    """``callback.attach(trainer)``: added to a Trainer built without it, restored from the
    checkpoint ``train(resume_from_checkpoint=True)`` resolves (the last one in output_dir), the
    same values as the uninterrupted run, and the call stack is never read."""
    import shutil

    out = tmp_path / "out"
    full: list[tuple[int, float]] = []
    resumed: list[tuple[int, float]] = []

    def sink(into):
        return lambda m, step: into.append((step, m[f"gsam/{LAYERS[0]}"]))

    options = CollectOptions(max_tokens_per_layer=None, phases="train")
    args = training_args(out, save_strategy="steps", save_steps=3)
    train(tr.Trainer(model=tiny_bert(), args=args, train_dataset=dataset(),
                     callbacks=[GSAMTrainerCallback(collection=options, sinks=[sink(full)])]))
    shutil.rmtree(out / "checkpoint-6")  # True resumes from the last checkpoint left: checkpoint-3

    monkeypatch.setattr("gsam_monitor.callbacks.hf.find_caller_self", _no_stack_walk)
    trainer = tr.Trainer(model=tiny_bert(), args=args, train_dataset=dataset())
    callback = GSAMTrainerCallback(collection=options, sinks=[sink(resumed)]).attach(trainer)
    assert trainer.callback_handler.callbacks.count(callback) == 1
    assert callback.attach(trainer) is callback and trainer.callback_handler.callbacks.count(callback) == 1
    train(trainer, resume_from_checkpoint=True)
    assert callback.monitor.step_count == 6
    assert [s for s, _ in resumed] == [4, 6]
    for (_, g_full), (_, g_resumed) in zip(full[1:], resumed, strict=True):
        assert g_resumed == pytest.approx(g_full, rel=1e-6)
    with pytest.raises(TypeError, match=r"expected a transformers\.Trainer; got Module"):
        callback.attach(torch.nn.Module())


def test_attached_callback_detaches_when_training_raises_without_the_stack(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("gsam_monitor.callbacks.hf.find_caller_self", _no_stack_walk)
    model = tiny_bert()
    trainer = tr.Trainer(model=model, args=training_args(tmp_path / "out"), train_dataset=dataset(),
                         callbacks=[Boom()])
    callback = GSAMTrainerCallback(collection=CollectOptions(phases="train")).attach(trainer)
    with pytest.raises(RuntimeError, match="boom at global step 3"):
        train(trainer)
    assert not callback.monitor.attached and hook_count(model) == 0


def test_resume_from_a_checkpoint_without_monitor_state_warns(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = training_args(out, save_strategy="steps", save_steps=3, max_steps=3)
    train(tr.Trainer(model=tiny_bert(), args=args, train_dataset=dataset()))  # no callback: no state file
    callback = GSAMTrainerCallback(every_n_steps=10, collection=CollectOptions(phases="train"))
    trainer = tr.Trainer(model=tiny_bert(), args=training_args(out, max_steps=4), train_dataset=dataset(),
                         callbacks=[callback])
    message = r"holds no gsam_monitor_state.pt; the monitor's windows restart at global step 3"
    with pytest.warns(RuntimeWarning, match=message):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    assert callback.monitor.step_count == 4


def test_collect_steps_still_sees_evaluation(tmp_path: Path) -> None:
    """collect_steps=1 parks the hooks on step 3, but the evaluation after it is collected
    (and the Trainer's final evaluation after step 4 too)."""
    logged: list[tuple[int, float | None, float | None]] = []
    callback = GSAMTrainerCallback(
        every_n_steps=4, collection=CollectOptions(steps=1, max_tokens_per_layer=None),
        sinks=[lambda m, step: logged.append((step, m.get(f"n/{LAYERS[0]}"), m.get(f"n/{LAYERS[0]}/eval")))],
    )
    args = training_args(tmp_path / "out", max_steps=4, eval_strategy="steps", eval_steps=3)
    eval_set = dataset(16, seed=1, padded=False)
    trainer = tr.Trainer(model=tiny_bert(), args=args, train_dataset=dataset(padded=False), eval_dataset=eval_set,
                         callbacks=[callback])
    train(trainer)
    assert logged == [(3, None, 16 * SEQ), (4, BATCH * SEQ, None), (4, None, 16 * SEQ)]  # train: only step 4


def test_default_schedule_collects_evaluations_between_the_training_windows(tmp_path: Path) -> None:
    """Default collect_steps (every_n_steps=20: the last 10 steps collected): the evaluations
    at steps 5 and 10, where the training hooks are parked, are collected in full, as the
    independent hooks record them, while the training window at 20 holds steps 11-20 (and the
    first forward) only."""
    logged: dict[int, dict[str, float]] = {}
    callback = GSAMTrainerCallback(
        every_n_steps=20,
        collection=CollectOptions(max_tokens_per_layer=None),
        sinks=[lambda m, step: logged.setdefault(step, {}).update(m)],
    )
    args = training_args(tmp_path / "out", max_steps=20, eval_strategy="steps", eval_steps=5)
    model = tiny_bert()
    trainer = tr.Trainer(model=model, args=args, train_dataset=dataset(128), eval_dataset=dataset(12, seed=1),
                         callbacks=[callback])
    recorder = Recorder(model, lambda: trainer.state)
    train(trainer)
    recorder.remove()
    assert callback.monitor.collect_steps == 10
    per_eval = len(recorder.eval_rows[LAYERS[0]]) // 4  # four evaluations: steps 5, 10, 15, 20
    for i, step in enumerate((5, 10)):
        rows = np.concatenate(recorder.eval_rows[LAYERS[0]][i * per_eval : (i + 1) * per_eval])
        assert logged[step][f"n/{LAYERS[0]}/eval"] == len(rows)
        assert logged[step][f"gsam/{LAYERS[0]}/eval"] == pytest.approx(gsam_pdet(rows)[0], rel=1e-6)
    # Training: steps 11-20, and the forward before the first step() ("auto" collects it).
    train_rows = np.concatenate([recorder.window(LAYERS[0], 1, 1), recorder.window(LAYERS[0], 11, 20)])
    assert logged[20][f"n/{LAYERS[0]}"] == len(train_rows)
    assert logged[20][f"gsam/{LAYERS[0]}"] == pytest.approx(gsam_pdet(train_rows)[0], rel=1e-6)


class Boom(tr.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise RuntimeError("boom at global step 3")


def test_detaches_when_training_raises(tmp_path: Path) -> None:
    model = tiny_bert()
    callback = GSAMTrainerCallback(collection=CollectOptions(phases="train"))
    trainer = tr.Trainer(model=model, args=training_args(tmp_path / "out"), train_dataset=dataset(),
                         callbacks=[callback, Boom()])
    with pytest.raises(RuntimeError, match="boom at global step 3"):
        train(trainer)
    assert not callback.monitor.attached
    assert hook_count(model) == 0
    assert callback.last_steps == {"train": 2}


def test_added_callback_detaches_in_its_context(tmp_path: Path) -> None:
    """``trainer.add_callback`` comes after the Trainer's init, so its ``train`` is not wrapped
    in time for this call; ``with callback:`` is the documented net."""
    model = tiny_bert()
    trainer = tr.Trainer(model=model, args=training_args(tmp_path / "out"), train_dataset=dataset(),
                         callbacks=[Boom()])
    with GSAMTrainerCallback(collection=CollectOptions(phases="train")) as callback:
        trainer.add_callback(callback)
        with pytest.raises(RuntimeError, match="boom at global step 3"):
            train(trainer)
        assert hook_count(model) > 0  # still attached inside the context
    assert hook_count(model) == 0 and not callback.monitor.attached


def test_tensorboard_true_opens_the_trainer_default_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    callback = GSAMTrainerCallback(tensorboard=True, wandb=False, collection=CollectOptions(phases="train"))
    trainer = tr.Trainer(model=tiny_bert(), args=training_args(tmp_path / "out", max_steps=2),
                         train_dataset=dataset(), callbacks=[callback])
    train(trainer)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars(f"gsam/{LAYERS[0]}")] == [2]
    assert "train/loss" not in acc.Tags()["scalars"]  # report_to="none": no Trainer writer


def test_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) 'windw' \(did you mean 'windows'\?\)"):
        GSAMTrainerCallback(windw="ema")
    for typo, meant in (("tensorbord", "tensorboard"), ("wand", "wandb"), ("on_alrt", "on_alert")):  # its own too
        with pytest.raises(TypeError, match=rf"unknown keyword argument\(s\) '{typo}' \(did you mean '{meant}'\?\);"
                           r" it takes .*on_alert.*tensorboard, wandb, windows"):  # fmt: skip
            GSAMTrainerCallback(**{typo: True})
    with pytest.raises(TypeError, match=r"tensorboard=\) must be None, True or False; got 'yes'"):
        GSAMTrainerCallback(tensorboard="yes")
    with pytest.raises(ValueError, match=r"^GSAMTrainerCallback\(every_n_steps=\) must be a positive int, or None to"):
        GSAMTrainerCallback(every_n_steps=0)
    # Values the monitor refuses fail when training starts, with the monitor's message.
    trainer = tr.Trainer(model=tiny_bert(), args=training_args(tmp_path / "out"), train_dataset=dataset(),
                         callbacks=[GSAMTrainerCallback(layers="encoder.layers.*")])
    with pytest.raises(ValueError, match=r"encoder\.layers\.\*"):
        train(trainer)


def test_train_begin_without_a_model_fails(tmp_path: Path) -> None:
    callback = GSAMTrainerCallback()
    args = training_args(tmp_path / "out")
    with pytest.raises(ValueError, match="the Trainer passed no model to on_train_begin"):
        callback.on_train_begin(args, tr.TrainerState(), tr.TrainerControl(), model=None)


def test_import_without_transformers_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # "import transformers" now fails
    monkeypatch.delitem(sys.modules, "gsam_monitor.callbacks.hf")
    monkeypatch.delattr(gsam_monitor.callbacks, "GSAMTrainerCallback", raising=False)
    with pytest.raises(ImportError, match=r"needs transformers.*" + re.escape(install_hint("hf", "transformers"))):
        gsam_monitor.callbacks.GSAMTrainerCallback  # noqa: B018
    with pytest.raises(AttributeError, match=r"has no attribute 'Nope'; it exports GSAMTrainerCallback, GSAMCallback"):
        gsam_monitor.callbacks.Nope  # noqa: B018
