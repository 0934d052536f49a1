"""Single-process trainer checks: SFT loss vs an independent reference, NaN guard, run outputs."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from engine.algorithms.sft import SFTStep
from engine.config import TrainConfig, load_config
from engine.data.sources import load_rows
from tests.helpers import single_process_parallel

BASE = [
    "data.num_samples=64", "data.seq_length=64", "data.micro_batch_size=2", "data.global_batch_size=4",
    "logging.progress=false", "checkpoint.save_interval=0", "checkpoint.resume=none",
]


def _trainer(tmp_path: Path, parallel: object, *extra: str) -> object:
    from engine.trainer import Trainer

    config = load_config(TrainConfig, None, BASE + [f"run.output_dir={tmp_path}", *extra])
    return Trainer(config, SFTStep(), parallel)


def test_sft_loss_matches_reference_cross_entropy_on_assistant_tokens(tmp_path: Path) -> None:
    with single_process_parallel() as parallel:
        trainer = _trainer(tmp_path, parallel)
        model = trainer.model.chunks[0]
        batch = trainer.train_data.collate([0, 1, 2])
        mask = batch["loss_mask"]
        # the mask covers exactly the assistant answer + EOS: check on the rendered text
        tokenizer = trainer.tokenizer
        rows, _ = load_rows(trainer.config.data, trainer.config.run.seed)
        replies = ["".join(m["content"] for m in row["messages"] if m["role"] == "assistant") for row in rows]
        for index in range(3):
            picked = batch["labels"][index][mask[index] > 0].tolist()
            answer = tokenizer.decode([i for i in picked if i != tokenizer.eos_id])
            # the masked labels are the start of one row's assistant replies (cut at seq_length), nothing else
            assert len(answer) >= 3 and any(reply.startswith(answer) for reply in replies), answer
            assert "User:" not in answer and "Assistant:" not in answer
            if picked[-1] == tokenizer.eos_id:
                assert answer in replies  # a whole reply ends with its EOS
        with torch.no_grad():
            positions = torch.arange(batch["tokens"].shape[1]).unsqueeze(0).expand_as(batch["tokens"])
            logits = model(batch["tokens"], positions, None)  # [b, s, vocab] without labels
            per_token = model(batch["tokens"], positions, None, labels=batch["labels"])
        reference = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="none")
        reference = (reference * mask.flatten()).sum() / mask.sum()
        total, count, _ = SFTStep().loss(batch, per_token)
        assert math.isclose(float(total / count), float(reference), rel_tol=1e-6)
        assert int(count) == int(mask.sum())


def test_assistant_mask_marks_only_the_answer(tmp_path: Path) -> None:
    from engine.data.sft import SFTDataset
    from engine.data.tokenizers import ByteTokenizer

    tokenizer = ByteTokenizer()
    rows = [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yes."}]}]
    sample = SFTDataset(rows, tokenizer, 32)[0]
    targets = sample["labels"][sample["loss_mask"] > 0].tolist()
    assert targets == tokenizer.encode("Yes.") + [tokenizer.eos_id]
    everything = SFTDataset(rows, tokenizer, 32, loss_on="all")[0]
    assert int(everything["loss_mask"].sum()) > len(targets)


class _NaNAtStep2(SFTStep):
    calls = 0

    def loss(self, batch, output):  # type: ignore[no-untyped-def]
        total, count, metrics = super().loss(batch, output)
        self.calls += 1
        if self.calls > 2:  # micro-batches 3+ belong to step 2
            total = total * float("nan")
            metrics = {self.loss_name: torch.stack([total.detach(), count.float()])}
        return total, count, metrics


def test_nan_loss_stops_naming_the_step(tmp_path: Path) -> None:
    from engine.trainer import Trainer, TrainingError

    with single_process_parallel() as parallel:
        config = load_config(TrainConfig, None, BASE + [f"run.output_dir={tmp_path}", "run.train_steps=4",
                                                        "checkpoint.save_interval=1"])
        trainer = Trainer(config, _NaNAtStep2(), parallel)
        with pytest.raises(TrainingError, match=r"lm_loss is nan at step 2; stopping before the optimizer update"):
            trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]
    assert (tmp_path / "curves.png").stat().st_size > 0  # drawn with step 1's checkpoint, kept by the failed run


def test_run_writes_config_metrics_curves_tensorboard_and_checkpoint(tmp_path: Path) -> None:
    with single_process_parallel() as parallel:
        trainer = _trainer(tmp_path, parallel, "run.train_steps=3", "run.eval_interval=3", "run.eval_batches=1",
                           "scheduler.type=constant", "scheduler.warmup_steps=2")
        result = trainer.fit()
    assert (tmp_path / "config.yaml").is_file()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    for key in ("lm_loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "memory_mb"):
        assert all(math.isfinite(r[key]) for r in train), key
    lr = 3e-3
    assert [r["lr"] for r in train] == pytest.approx([lr / 2, lr, lr])  # warm-up 2 steps, then constant
    assert any(r["split"] == "validation" for r in records) and 3 in result.validation
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert result.checkpoint and Path(result.checkpoint, "keel.json").is_file()
    from PIL import Image

    from engine.cli import _run_outputs

    with Image.open(tmp_path / "curves.png") as image:  # lm_loss, grad_norm, lr: two rows of two panels
        assert image.format == "PNG" and image.size == (720, 460)
    assert _run_outputs(str(tmp_path)) == ("config.yaml (resolved config), metrics.jsonl, curves.png (learning "
                                           "curves), tensorboard/")


def test_bf16_trains_with_fp32_master_weights(tmp_path: Path) -> None:
    with single_process_parallel() as parallel:
        trainer = _trainer(tmp_path, parallel, "precision.dtype=bf16", "run.train_steps=3")
        params = list(trainer.model.chunks[0].parameters())
        assert all(p.dtype == torch.bfloat16 for p in params)
        losses = [trainer.train_step(step)["lm_loss"] for step in (1, 2, 3)]
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
        master = trainer.model.optimizer.optimizer.param_groups[0]["params"][0]
        assert master.dtype == torch.float32


def test_fp8_and_te_spec_need_transformer_engine() -> None:
    from engine.config import ConfigError, PrecisionConfig
    from engine.models.builder import check_fp8, use_transformer_engine

    assert use_transformer_engine("auto") is False  # no CUDA here: the local spec
    with pytest.raises(ConfigError, match=r"model.layer_spec=te needs the transformer-engine package and a CUDA GPU"):
        use_transformer_engine("te")
    with pytest.raises(ConfigError, match=r"precision.fp8=hybrid needs Transformer Engine on a CUDA GPU"):
        check_fp8(PrecisionConfig(dtype="bf16", fp8="hybrid"), use_te=False)
    check_fp8(PrecisionConfig(dtype="bf16"), use_te=False)  # no FP8 requested: fine


def test_group_by_length_keeps_the_rows_and_group_sizes() -> None:
    from engine.trainer import cut_to_length, group_by_length, padded_length

    lengths = {0: 5, 1: 90, 2: 17, 3: 64, 4: 33, 5: 2}
    groups = group_by_length([[0, 1], [2, 3], [4, 5]], lengths.__getitem__)
    assert groups == [[1, 3], [4, 2], [0, 5]]
    assert padded_length(90, 128, 8) == 96 and padded_length(125, 128, 16) == 128 and padded_length(0, 64, 8) == 8
    batch = {"tokens": torch.zeros(2, 64), "loss_mask": torch.ones(2, 64), "end_index": torch.tensor([3, 9])}
    cut = cut_to_length(batch, 16)
    assert cut["tokens"].shape == (2, 16) and cut["loss_mask"].shape == (2, 16) and cut["end_index"].shape == (2,)


def test_cut_micro_batches_are_padded_only_where_a_layout_needs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU a micro-batch is cut to its longest row exactly; sequence parallelism rounds to the TP
    size (megatron splits the positions); a GPU keeps each rank's share a multiple of 16."""
    from engine.data.batching import length_multiple, micro_batches_for
    from engine.parallel.layout import ParallelLayout

    class Rows:
        lengths = [37, 5, 21, 12]

        def __len__(self) -> int:
            return len(self.lengths)

        def length(self, index: int) -> int:
            return self.lengths[index]

        def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
            return {"tokens": torch.zeros(len(indices), 64, dtype=torch.long)}

    plain, sp = ParallelLayout(2, 1, 1), ParallelLayout(2, 1, 1, sequence_parallel=True)
    assert (length_multiple(ParallelLayout(1, 1, 1)), length_multiple(plain), length_multiple(sp)) == (1, 1, 2)
    shapes = [b["tokens"].shape[1] for b in micro_batches_for([[0, 1], [2, 3]], Rows(), 64, plain, True)]
    assert shapes == [37, 12]  # (37, 21) and (12, 5): each cut to its longest row
    assert [b["tokens"].shape[1] for b in micro_batches_for([[0, 1], [2, 3]], Rows(), 64, sp, True)] == [38, 12]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (length_multiple(plain), length_multiple(sp)) == (16, 32)


@pytest.mark.parametrize("algo", ["sft", "rm"])
def test_group_by_length_trains_the_same_model(tmp_path: Path, algo: str) -> None:
    """Grouping rows by length and cutting padding changes only the order of floating-point sums."""
    from engine.algorithms.reward import RewardStep, RewardTrainConfig
    from engine.trainer import Trainer

    runs = {}
    for grouped in (False, True):
        cls = RewardTrainConfig if algo == "rm" else TrainConfig
        config = load_config(cls, None, BASE + ["data.seq_length=256", "data.global_batch_size=8", "run.train_steps=3",
                                                f"data.group_by_length={str(grouped).lower()}", "logging.tensorboard=false",
                                                "run.eval_interval=0", f"run.output_dir={tmp_path / str(grouped)}"])
        with single_process_parallel() as parallel:
            step = RewardStep(config.rm) if algo == "rm" else SFTStep()
            trainer = Trainer(config, step, parallel)
            metrics = [trainer.train_step(n) for n in (1, 2, 3)]
            shapes = [b["tokens"].shape[1] for b in trainer._next_micro_batches(trainer.sampler, trainer.train_data)]
        runs[grouped] = (metrics, shapes)
    (plain, plain_shapes), (grouped_metrics, grouped_shapes) = runs[False], runs[True]
    assert set(plain_shapes) == {256} and min(grouped_shapes) < 256  # padding was cut
    for a, b in zip(plain, grouped_metrics, strict=True):
        assert math.isclose(a[step.loss_name], b[step.loss_name], rel_tol=1e-5)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4)


def test_cpu_adamw_runs_fused_and_matches_the_loop(tmp_path: Path) -> None:
    from engine.trainer import _fuse_cpu_adamw

    with single_process_parallel() as parallel:
        trainer = _trainer(tmp_path, parallel)
        groups = trainer.model.optimizer.optimizer.param_groups
        assert groups and all(g["fused"] and not g["foreach"] for g in groups)
    # the fused kernel is the same AdamW update as torch's per-tensor loop
    torch.manual_seed(0)
    loop = torch.nn.Parameter(torch.randn(300))
    fused = torch.nn.Parameter(loop.detach().clone())
    opts = [torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1) for p in (loop, fused)]

    class Wrapped:
        optimizer = opts[1]

    _fuse_cpu_adamw(Wrapped())
    assert opts[1].param_groups[0]["fused"] and not opts[0].param_groups[0]["fused"]
    for _ in range(5):
        grad = torch.randn(300)
        loop.grad, fused.grad = grad.clone(), grad.clone()
        for opt in opts:
            opt.step()
    assert torch.allclose(loop, fused, rtol=0, atol=1e-6)


def _steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["split"] == "train"]


def test_metrics_of_a_reused_directory_start_fresh_or_at_the_resumed_step(tmp_path: Path) -> None:
    """A fresh run does not append to an old run's metrics.jsonl; a resumed run drops what the
    interrupted run logged after the checkpoint it resumes from (it logs those steps again), a record
    the crash cut short included, and draws its curves from the whole records."""
    common = ("run.train_steps=4", "checkpoint.save_interval=2", "checkpoint.keep_last=0")
    with single_process_parallel() as parallel:
        _trainer(tmp_path, parallel, *common).fit()
    assert _steps(tmp_path) == [1, 2, 3, 4]
    with single_process_parallel() as parallel:  # the same directory, a fresh run of 3 steps
        _trainer(tmp_path, parallel, "run.train_steps=3", *common[1:]).fit()
    assert _steps(tmp_path) == [1, 2, 3]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000003"  # the final save
    with open(tmp_path / "metrics.jsonl", "a") as fh:  # as if the run had logged step 4 and died before saving,
        fh.write(json.dumps({"step": 4, "split": "train", "lm_loss": 123.0}) + "\n")
        fh.write('{"step": 5, "split": "train", "lm_lo')  # in the middle of writing step 5's record
    with single_process_parallel() as parallel:  # resumes from step 3
        result = _trainer(tmp_path, parallel, "run.train_steps=5", "checkpoint.resume=auto", *common[1:]).fit()
    assert result.start_step == 3
    assert _steps(tmp_path) == [1, 2, 3, 4, 5]
    assert 123.0 not in [json.loads(line).get("lm_loss") for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert (tmp_path / "curves.png").stat().st_mtime >= (tmp_path / "checkpoints" / "latest").stat().st_mtime


def test_a_resumed_run_trains_with_its_own_schedule(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Extending a finished cosine run (4 -> 6 steps) with another LR: the new steps train at the config's
    schedule (the checkpoint's used to win: decay over 4 steps, so steps 5-6 ran at LR 0), and the run says so."""
    common = ("scheduler.type=cosine", "scheduler.warmup_steps=1", "checkpoint.save_interval=2")
    with single_process_parallel() as parallel:
        _trainer(tmp_path, parallel, "run.train_steps=4", "optimizer.lr=1e-3", *common).fit()
    with single_process_parallel() as parallel:
        trainer = _trainer(tmp_path, parallel, "run.train_steps=6", "optimizer.lr=2e-3", "checkpoint.resume=auto",
                           *common)
        with caplog.at_level("WARNING", logger="engine.runner"):
            result = trainer.fit()  # type: ignore[attr-defined]
    assert result.start_step == 4
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if r["split"] == "train"}
    # cosine from 2e-3 to 0 reached one step past the last (decay horizon 7 = 1 warm-up + 6), at steps 5 and 6
    # (the LR a step trains with); the last step trains too, not at the cosine's final 0
    expected = {step: 1e-3 * (1 + math.cos(math.pi * (step - 1) / 6)) for step in (5, 6)}
    assert lrs[5] == pytest.approx(expected[5]) and lrs[6] == pytest.approx(expected[6], abs=1e-12), lrs
    assert lrs[5] > 1e-4 and lrs[6] > 1e-5  # not the finished run's 0
    assert "optimizer.lr: 0.001 -> 0.002" in caplog.text and "run.train_steps + 1): 5 -> 7" in caplog.text


def test_a_resume_on_other_data_is_one_error_and_other_batch_or_length_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Resuming on a training set of another size is refused with a CheckpointError (one line in the CLI) that
    names the checkpoint and the two ways to train on the new data, before the weights are loaded; another
    data.global_batch_size or data.seq_length resumes with a warning naming the checkpoint's and this run's."""
    from engine.checkpoint.dist import CheckpointError

    with single_process_parallel() as parallel:
        _trainer(tmp_path, parallel, "run.train_steps=2", "checkpoint.save_interval=2", "data.seq_length=128").fit()
    step_2 = tmp_path / "checkpoints" / "step_0000002"
    with single_process_parallel() as parallel, pytest.raises(CheckpointError) as refused:
        _trainer(tmp_path, parallel, "run.train_steps=4", "data.num_samples=80", "data.seq_length=128",
                 "checkpoint.resume=auto").fit()
    message = str(refused.value)  # builtin:sft keeps 61 of 64 rows for training (all fit 128 tokens), 76 of 80
    assert message.startswith(f"{step_2} ") and "61 samples, this one has 76" in message, message
    assert "checkpoint.resume=none" in message and f"checkpoint.load={step_2} and another run.output_dir" in message
    with single_process_parallel() as parallel:
        trainer = _trainer(tmp_path, parallel, "run.train_steps=3", "data.global_batch_size=8", "data.seq_length=192",
                           "checkpoint.resume=auto")
        with caplog.at_level("WARNING", logger="engine.trainer"):
            assert trainer.fit().start_step == 2  # type: ignore[attr-defined]
    assert "data.global_batch_size: 4 -> 8; data.seq_length: 128 -> 192" in caplog.text, caplog.text


def test_ctrl_c_checkpoints_after_the_step_and_the_run_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (SIGINT) stops a run as SIGTERM does: after the current step, with a checkpoint of it, so
    that the same command resumes there; a second Ctrl-C later on stops at once (Python's default)."""
    common = ("run.train_steps=6", "checkpoint.save_interval=0", "checkpoint.keep_last=0")
    monkeypatch.setenv("KEEL_FAULT", "after:3:INT")
    with single_process_parallel() as parallel:
        stopped = _trainer(tmp_path, parallel, *common).fit()
    assert (stopped.stopped_by, stopped.end_step) == ("SIGINT", 3)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    monkeypatch.delenv("KEEL_FAULT")
    with single_process_parallel() as parallel:
        resumed = _trainer(tmp_path, parallel, *common, "checkpoint.resume=auto").fit()
    assert (resumed.start_step, resumed.end_step, resumed.stopped_by) == (3, 6, None)
    assert _steps(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_keel_train_stopped_by_ctrl_c_exits_130_and_by_sigterm_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """It exited 0 after Ctrl-C, so that `keel train sft && keel train dpo ...` went on from a part-trained model.
    Pre-emption (SIGTERM) stays a planned stop: 0, and the job script requeues."""
    from engine.cli import main

    argv = ["train", "sft", *BASE, "run.train_steps=4", "data.tokenizer=byte"]
    for signal_name, code in (("INT", 130), ("TERM", 0)):
        monkeypatch.setenv("KEEL_FAULT", f"after:2:{signal_name}")
        assert main([*argv, f"run.output_dir={tmp_path / signal_name}"]) == code
        assert f"steps 1..2 of 4 (stopped by SIG{signal_name})" in capsys.readouterr().out
        assert (tmp_path / signal_name / "checkpoints" / "latest").read_text().strip() == "step_0000002"


def test_a_second_ctrl_c_stops_at_once_and_the_handlers_are_put_back(monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    import os
    import signal

    from engine import stop_signals

    before = signal.getsignal(signal.SIGINT)
    with stop_signals.StopSignals() as signals, caplog.at_level("WARNING", logger="engine.stop_signals"):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # torchrun's forwarded copy of the same Ctrl-C: no effect
        assert signals.received == "SIGINT"
        assert "a second Ctrl-C more than 2 s after this one stops at once" in caplog.text  # why this one did not
        monkeypatch.setattr(stop_signals, "REPEAT_S", -1.0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_forked_child_keeps_quiet_on_sigterm(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """megatron's checkpoint writers are forked with the handlers, and a launcher's SIGTERM to the process
    group reached them too: 'SIGTERM received: will checkpoint' came twice from rank 0."""
    import os
    import signal

    from engine.stop_signals import StopSignals

    with StopSignals() as signals, caplog.at_level("WARNING", logger="engine.stop_signals"):
        child = os.fork()
        if child == 0:  # the writer: its copy of the handler ignores the signal and the child finishes its work
            os.kill(os.getpid(), signal.SIGTERM)
            os._exit(0 if signals.received is None and not caplog.records else 3)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert signals.received is None and not caplog.records
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == "SIGTERM" and len(caplog.records) == 1


class _PeerLostAtStep2(SFTStep):
    calls = 0

    def loss(self, batch, output):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls > 2:  # what gloo raises when the rank at the other end of a collective died
            raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")
        return super().loss(batch, output)


@pytest.mark.parametrize("peer", [True, False], ids=["peer-lost", "own-error"])
def test_after_a_peer_is_lost_the_launchers_sigterm_cannot_end_the_rank_before_its_line(
        tmp_path: Path, peer: bool) -> None:
    """torchrun SIGTERMs the survivors as soon as one rank exits; SIGTERM's default (the handlers put back as
    training ends) would end a rank before the CLI printed its one line. After another rank's failure the
    stop signals stay ignored until the process exits; after its own error, the handlers are put back."""
    import signal

    from engine.trainer import Trainer, TrainingError

    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        with single_process_parallel() as parallel:
            config = load_config(TrainConfig, None, BASE + [f"run.output_dir={tmp_path}", "run.train_steps=3"])
            trainer = Trainer(config, _PeerLostAtStep2() if peer else _NaNAtStep2(), parallel)
            with pytest.raises(RuntimeError if peer else TrainingError):
                trainer.fit()
        after = {signum: signal.getsignal(signum) for signum in before}
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    assert after == ({signum: signal.SIG_IGN for signum in before} if peer else before)


def test_ctrl_c_outside_training_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from engine import cli

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_train", lambda *args: interrupted(args))
    assert cli.main(["train", "sft"]) == 130
    assert capsys.readouterr().err.startswith("keel: interrupted (Ctrl-C);")


def test_a_fresh_run_sets_an_earlier_runs_checkpoints_aside(tmp_path: Path) -> None:
    """checkpoint.resume=none in a directory with an earlier run's checkpoints: they are moved aside,
    not mixed with the new run's (keep_last kept the highest steps and deleted the new run's own
    checkpoint, and a later resume picked up the earlier run's weights). A checkpoint past
    run.train_steps is refused by name instead of a run that trains steps 7..5."""
    from engine.checkpoint.dist import CheckpointError

    checkpoints = tmp_path / "checkpoints"
    with single_process_parallel() as parallel:
        _trainer(tmp_path, parallel, "run.train_steps=6", "checkpoint.save_interval=2", "checkpoint.keep_last=2").fit()
    with single_process_parallel() as parallel:
        fresh = _trainer(tmp_path, parallel, "run.train_steps=3", "checkpoint.save_interval=1",
                         "checkpoint.keep_last=2").fit()
    assert fresh.start_step == 0 and (checkpoints / "latest").read_text().strip() == "step_0000003"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_0000002", "step_0000003"]
    (aside,) = tmp_path.glob("checkpoints.earlier-*")
    assert sorted(p.name for p in aside.glob("step_*")) == ["step_0000004", "step_0000006"]
    with single_process_parallel() as parallel, pytest.raises(CheckpointError, match="lies in checkpoint.dir"):
        _trainer(tmp_path, parallel, "run.train_steps=3", f"checkpoint.load={checkpoints}").fit()
    with single_process_parallel() as parallel:
        resumed = _trainer(tmp_path, parallel, "run.train_steps=4", "checkpoint.resume=auto").fit()
    assert (resumed.start_step, resumed.end_step) == (3, 4)
    with single_process_parallel() as parallel, pytest.raises(CheckpointError, match="is step 4, past run.train_steps=2"):
        _trainer(tmp_path, parallel, "run.train_steps=2", "checkpoint.resume=auto").fit()


def test_a_missing_checkpoint_load_is_refused_before_the_model_is_built(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import trainer as trainer_module
    from engine.checkpoint.dist import CheckpointError

    def never(*args: object) -> None:
        raise AssertionError("the model was built before checkpoint.load was checked")

    monkeypatch.setattr(trainer_module.ModelRunner, "trained", never)
    with single_process_parallel() as parallel, pytest.raises(CheckpointError, match=r"checkpoint.load .*checkpoints does not exist; give a run directory"):
        _trainer(tmp_path, parallel, f"checkpoint.load={tmp_path / 'sft' / 'checkpoints'}")


def test_a_bad_tokenizer_is_refused_before_the_model_is_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import trainer as trainer_module
    from engine.config import ConfigError

    def never(*args: object) -> None:
        raise AssertionError("the model was built before data.tokenizer was read")

    monkeypatch.setattr(trainer_module.ModelRunner, "trained", never)
    with single_process_parallel() as parallel, pytest.raises(ConfigError, match="data.tokenizer="):
        _trainer(tmp_path, parallel, f"data.tokenizer={tmp_path / 'nope.model'}")


def test_rows_all_dropped_for_length_are_one_error_before_the_model_is_built(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row's prompt fills data.seq_length: a DataError naming the file, how many rows were dropped and why,
    and data.seq_length, before the models are built (it was the sampler's "the data set is empty" after)."""
    from engine import trainer as trainer_module
    from engine.data.errors import DataError

    def never(*args: object) -> None:
        raise AssertionError("the model was built for an empty training set")

    path = tmp_path / "long.jsonl"
    row = {"messages": [{"role": "user", "content": "a long prompt " * 50}, {"role": "assistant", "content": "ok"}]}
    path.write_text("".join(json.dumps(row) + "\n" for _ in range(20)))
    monkeypatch.setattr(trainer_module.ModelRunner, "trained", never)
    with single_process_parallel() as parallel, pytest.raises(DataError) as refused:
        _trainer(tmp_path, parallel, f"data.source={path}", "data.seq_length=128")
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and "all 19 rows were dropped (19 with no loss token" in message, message
    assert "raise data.seq_length" in message


def test_validation_says_what_it_reads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A validation reads run.eval_batches global batches in a fixed order: it wrapped around a 3-pair set
    (accuracies of 0.3125 and 0.34375 on 3 pairs) and read 32 rows of a large one, without a word. A small set
    is now read once (tests/engine/test_validation_once.py); a step whose loss cannot leave rows out wraps."""
    small = ["data.num_samples=64", "data.validation_fraction=0.05", "data.global_batch_size=4",
             "data.micro_batch_size=2", "run.eval_batches=2"]
    with single_process_parallel() as parallel, caplog.at_level(logging.INFO, logger="engine.trainer"):
        trainer: Any = _trainer(tmp_path, parallel, *small)
        trainer.evaluate()
        trainer.evaluate()
    assert caplog.text.count("each validation reads all 3 validation rows once, in 1 global batch; the last is "
                             "filled with 1 row that counts nothing") == 1, caplog.text
    caplog.clear()
    with single_process_parallel() as parallel, caplog.at_level(logging.INFO, logger="engine.trainer"):
        trainer = _trainer(tmp_path, parallel, *small)
        trainer.step.reads_keep = False
        trainer.evaluate()
    assert caplog.text.count("each validation reads 8 rows (run.eval_batches x data.global_batch_size) from a "
                             "validation set of 3, so some rows count more than once") == 1, caplog.text
    caplog.clear()
    with single_process_parallel() as parallel, caplog.at_level(logging.INFO, logger="engine.trainer"):
        trainer = _trainer(tmp_path, parallel, "data.num_samples=400", "data.validation_fraction=0.1",
                           "data.global_batch_size=4", "data.micro_batch_size=2", "run.eval_batches=2")
        trainer.evaluate()
    assert f"each validation reads the first 8 of the {len(trainer.valid_data)} validation rows (run.eval_batches=2" \
        in caplog.text and len(trainer.valid_data) > 8, caplog.text


def test_validation_asked_for_and_none_held_out_is_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A small file's 5% held out rounds to no row: run.eval_interval then validated nothing, silently."""
    from engine.trainer import Trainer

    rows = tmp_path / "chat.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i}."},
                                                     {"role": "assistant", "content": f"{i}."}]}) + "\n"
                            for i in range(6)))
    with single_process_parallel() as parallel:
        for fraction, warned in (("0.05", True), ("0.5", False)):
            caplog.clear()
            config = load_config(TrainConfig, None, BASE + [f"run.output_dir={tmp_path / fraction}", "run.eval_interval=1",
                                                            f"data.source={rows}", f"data.validation_fraction={fraction}"])
            with caplog.at_level(logging.WARNING, logger="engine.trainer"):
                Trainer(config, SFTStep(), parallel)
            assert (f"no validation rows (data.validation_fraction={fraction} of {rows} holds out none): validation "
                    "is skipped and no best checkpoint is kept" in caplog.text) is warned, caplog.text
    # 3 rows left to train on, for a global batch of 4: every step repeats some (it went unsaid)
    assert "3 training samples for data.global_batch_size=4: each step repeats samples" in caplog.text


def test_a_named_validation_set_never_evaluated_is_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """data.validation_source was read and length-checked, and with run.eval_interval=0 (the default) never
    evaluated: metrics.jsonl had no validation row and nothing said why."""
    with single_process_parallel() as parallel, caplog.at_level("WARNING", logger="engine.trainer"):
        _trainer(tmp_path, parallel, "data.validation_source=builtin:sft")
    assert "data.validation_source=builtin:sft is read but never evaluated: run.eval_interval=0" in caplog.text
    caplog.clear()
    with single_process_parallel() as parallel, caplog.at_level("WARNING", logger="engine.trainer"):
        _trainer(tmp_path, parallel, "data.validation_source=builtin:sft", "run.eval_interval=5")
        _trainer(tmp_path, parallel)  # drawn from the built-in set's own generator: no training row is held out
    assert "never evaluated" not in caplog.text and "holds" not in caplog.text
    # rows held out of the user's own file for a validation that never runs were trained on by no one, unsaid
    rows = tmp_path / "chat.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i}."},
                                                     {"role": "assistant", "content": f"{i}."}]}) + "\n"
                            for i in range(40)))
    with single_process_parallel() as parallel, caplog.at_level("WARNING", logger="engine.trainer"):
        _trainer(tmp_path, parallel, f"data.source={rows}")
        assert f"data.validation_fraction=0.05 holds 2 rows of {rows} out of training for a validation this run " \
               "never runs (run.eval_interval=0, the default): set data.validation_fraction=0" in caplog.text
        caplog.clear()
        _trainer(tmp_path, parallel, f"data.source={rows}", "data.validation_fraction=0")
    assert "holds" not in caplog.text


@pytest.mark.parametrize("rows, read, said", [
    (1, 4, "each validation reads its 1 validation row once, in 1 global batch; the last is filled with 3 rows "
           "that count nothing"),
    (8, 8, "each validation reads all 8 validation rows once, in 2 global batches\n"),
])
def test_what_validation_reads_is_said_in_plain_words(rows: int, read: int, said: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """'reads all 1 validation rows', and 'filled with 0 row that counts nothing' for a set of whole batches."""
    from types import SimpleNamespace

    from engine.trainer import Trainer

    trainer = SimpleNamespace(_told_validation=False, parallel=SimpleNamespace(is_main=True),
                              config=SimpleNamespace(data=SimpleNamespace(global_batch_size=4)))
    with caplog.at_level("INFO", logger="engine.trainer"):
        Trainer._say_what_validation_reads(trainer, rows, read, True)  # type: ignore[arg-type]
    assert said in caplog.text + "\n", caplog.text
