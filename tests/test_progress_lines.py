"""Progress wherever the output goes: in a terminal the Rich bars; anywhere else (a pipe, a log file, a DVC stage) one
plain line per epoch and one as each phase of the run starts and ends."""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from helpers.config import TINY, make_config
from helpers.processes import run_entry
from vaelab.data.datamodule import TensorBatches
from vaelab.stages.epoch_progress import epoch_progress
from vaelab.stages.phases import Phases
from vaelab.stages.progress import is_terminal
from vaelab.stages.train import build_module
from vaelab.training.callbacks import EpochHistory, EpochLines, ThrottledRichProgressBar, epoch_line

EPOCH_LINE = re.compile(
    r"epoch (\d+)/(\d+) \| \d+ images/s \| train loss -?\d+\.\d\d \| val/elbo -?\d+\.\d\d \| "
    r"\d+:\d\d:\d\d elapsed, ~\d+:\d\d:\d\d left"
)


def test_an_epoch_line_says_the_epoch_of_all_its_throughput_losses_and_times():
    line = epoch_line(3, 10, 5123.4, 27.4149, -26.931, elapsed=12.2, left=28.4)
    assert line == "epoch 3/10 | 5123 images/s | train loss 27.41 | val/elbo -26.93 | 0:00:12 elapsed, ~0:00:28 left"
    assert EPOCH_LINE.fullmatch(line)


def test_an_epoch_line_leaves_out_what_the_run_does_not_have():
    line = epoch_line(3, None, 5123.4, 27.4149, None, elapsed=3725.0, left=None)
    assert line == "epoch 3 | 5123 images/s | train loss 27.41 | 1:02:05 elapsed"


def test_a_phase_is_announced_as_it_starts_and_ends(capsys: pytest.CaptureFixture[str]):
    phases = Phases(announce=True)
    with phases("figures"):
        print("drawing")
    phases.add("fit", 2.25)  # a phase timed by hand is announced as it is counted
    assert capsys.readouterr().out.splitlines() == [
        "phase figures ...",
        "drawing",
        f"phase figures done in {phases.seconds['figures']:.1f} s",
        "phase fit done in 2.2 s",
    ]
    assert set(phases.metrics()) == {"time/figures_s", "time/fit_s"}


def test_a_phase_cut_short_by_an_error_is_not_said_to_be_done(capsys: pytest.CaptureFixture[str]):
    phases = Phases(announce=True)
    with pytest.raises(RuntimeError), phases("estimates"):
        raise RuntimeError("no")
    assert capsys.readouterr().out.splitlines() == ["phase estimates ..."]
    assert "estimates" in phases.seconds  # its time still counts


def test_phases_are_silent_when_not_announced(capsys: pytest.CaptureFixture[str]):
    phases = Phases(announce=False)
    with phases("figures"):
        pass
    phases.add("fit", 1.0)
    assert capsys.readouterr().out == ""


def test_a_pipe_is_not_a_terminal_unless_richs_override_says_it_is(monkeypatch: pytest.MonkeyPatch):
    for name in ("TTY_INTERACTIVE", "TTY_COMPATIBLE", "FORCE_COLOR"):
        monkeypatch.delenv(name, raising=False)
    assert not is_terminal()  # pytest captures stdout: not a terminal
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    assert is_terminal()
    monkeypatch.setenv("TTY_INTERACTIVE", "0")
    assert not is_terminal()
    assert Phases().announce  # not a terminal: the phases are announced


def test_in_a_terminal_the_configured_bar_draws_and_nothing_is_added(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    bar = ThrottledRichProgressBar()
    assert epoch_progress([bar], EpochHistory()) == []
    assert bar.is_enabled
    assert not Phases().announce


def test_off_a_terminal_the_rich_bar_gives_way_to_epoch_lines(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TTY_INTERACTIVE", "0")
    bar, history = ThrottledRichProgressBar(), EpochHistory()
    [lines] = epoch_progress([bar], history)
    assert isinstance(lines, EpochLines) and lines.history is history
    assert not bar.is_enabled  # it would print only its last frame, at the end


def test_a_run_configured_without_a_bar_shows_no_epoch_lines_either(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TTY_INTERACTIVE", "0")
    assert epoch_progress([], EpochHistory()) == []


def test_a_fit_prints_one_line_per_epoch_as_it_ends(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    module = build_module(make_config("arch.hidden=[16]", "model.latent_dim=2"), (1, 8, 8), 256)
    images = (torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    history = EpochHistory()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
        callbacks=[history, EpochLines(history)],
    )
    trainer.fit(
        module,
        train_dataloaders=TensorBatches(images, 8, shuffle=True),
        val_dataloaders=TensorBatches(images, 8, shuffle=False),
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert [EPOCH_LINE.fullmatch(line).groups() for line in lines] == [("1", "3"), ("2", "3"), ("3", "3")]
    assert lines[-1].endswith(", ~0:00:00 left")  # nothing left after the last epoch
    assert all(f"train loss {row['train/loss']:.2f}" in line for row, line in zip(history.rows, lines, strict=True))


@pytest.mark.subprocess
def test_a_run_whose_output_is_not_a_terminal_logs_a_line_per_epoch_and_per_phase_and_nothing_else(
    project: Path, tmp_path: Path
):
    asked = ("trainer.max_epochs=3", "eval.after_train=true", "publish=true")  # every phase there is
    # A machine's first run: an empty cache, where MLflow makes its first store and matplotlib its font list.
    first_run = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "MPLCONFIGDIR": str(tmp_path / "matplotlib")}
    done = run_entry("train.py", *TINY, *asked, root=project, env=first_run)
    out = done.stdout.splitlines()
    assert (tmp_path / "cache" / "vaelab").is_dir()  # the first store was made here

    # Nothing a user cannot act on: vaelab's own lines only (the tiny model's collapse warning is one to act on).
    assert done.stderr == ""
    vaelab_line = re.compile(rf"{EPOCH_LINE.pattern}|phase \w+ (\.\.\.|done in .*)|vaelab: .*|trained \(best .*")
    assert [line for line in out if not vaelab_line.fullmatch(line)] == []
    assert out[-1].startswith("trained (best epoch ") and " of 3): val/elbo " in out[-1]  # counted as the epochs

    epochs = [line for line in out if line.startswith("epoch ")]
    assert [EPOCH_LINE.fullmatch(line).groups() for line in epochs] == [("1", "3"), ("2", "3"), ("3", "3")]
    assert not any("Epoch" in line or "━" in line for line in out)  # no frame of a Rich bar
    assert "" not in out  # nor the empty line a transient one leaves

    started = [m[1] for line in out if (m := re.fullmatch(r"phase (\w+) \.\.\.", line))]
    ended = [m[1] for line in out if (m := re.fullmatch(r"phase (\w+) done in \d+\.\d s", line))]
    after_fit = ["estimates", "figures", "model_logging", "publish", "evaluation"]
    evaluation = ["test_estimates", "test_figures", "test_logging"]
    assert started == [*after_fit[:-1], "evaluation", *evaluation]
    assert ended == ["setup", "fit", *after_fit[:-1], *evaluation, "evaluation"]
    # The epochs come between the end of setup and the end of fit.
    at = {
        name: next(i for i, line in enumerate(out) if line.startswith(f"phase {name} done"))
        for name in ("setup", "fit")
    }
    assert at["setup"] < out.index(epochs[0]) and out.index(epochs[-1]) < at["fit"]


def test_the_terminal_bar_counts_epochs_from_one_to_max_epochs_and_leaves_out_the_loggers_version(tmp_path: Path):
    from lightning.pytorch.loggers import CSVLogger

    bar = ThrottledRichProgressBar()
    trainer = pl.Trainer(max_epochs=2, logger=CSVLogger(tmp_path), callbacks=[bar], enable_checkpointing=False)
    bar.setup(trainer, None, stage="fit")
    assert bar._get_train_description(1).strip() == "Epoch 2/2"  # the second of two (Lightning: "Epoch 1/1")
    shown = bar.get_metrics(trainer, None)
    assert "v_num" not in shown
    assert "v_num" in pl.callbacks.RichProgressBar.get_metrics(bar, trainer, None)  # what the bar leaves out
