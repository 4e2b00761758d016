"""The demo (the main job) end to end, and the syncstep command."""

from __future__ import annotations

import re
import sys

import syncstep
from helpers import run


def test_demo_trains_ddp_on_two_processes_and_reaches_095(tmp_path):
    result = run([sys.executable, "-m", "syncstep.cli", "demo", "--root", str(tmp_path / "demo"), "--no-progress-bar"],
                 timeout=240, cwd=str(tmp_path))
    out = result.stdout
    assert "starting 2 processes" in out
    assert "strategy=ddp accelerator=cpu world size 2" in out
    assert len(re.findall(r"^epoch \d+: val_acc=", out, flags=re.M)) == 20
    accuracy = float(re.search(r"final validation accuracy: ([0-9.]+)", out).group(1))
    assert accuracy >= 0.95
    assert "syncstep: noise scale: B_simple" in out  # the end-of-fit report (noise_scale=True in the demo)
    for png in ("demo.png", "lr_schedule.png", "noise_scale.png"):
        data = (tmp_path / "demo" / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000


def test_lr_plot_draws_a_scripts_schedule_without_training(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(tmp_path.parent.parent)!r})\n"
        "import syncstep\n"
        "from syncstep.examples.digits import Classifier, digits_loaders\n"
        "train, _ = digits_loaders(32)\n"
        "trainer = syncstep.Trainer(max_epochs=3, accelerator='cpu', devices=4, strategy='ddp', warmup_epochs=1)\n"
        "trainer.fit(Classifier(0.05, 3), train)\n"
        "raise SystemExit('training should not have started')\n"
    )
    result = run([sys.executable, "-m", "syncstep.cli", "lr-plot", "--out", str(tmp_path / "lr.png"), str(script)],
                 timeout=120, cwd=str(tmp_path))
    assert "factor 4: 0.05 -> 0.2" in result.stdout
    assert "warmup: linear over 12 steps (1 epochs)" in result.stdout
    assert (tmp_path / "lr.png").read_bytes().startswith(b"\x89PNG")
    assert "starting" not in result.stdout  # no process was launched


def test_lr_schedule_from_python_matches_the_plan():
    from syncstep.examples.digits import Classifier, digits_loaders

    train, _ = digits_loaders(32)
    trainer = syncstep.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="dp", warmup_epochs=1)
    lrs = trainer.lr_schedule(Classifier(0.05, 2), train)["lr-SGD"]
    assert len(lrs) == 2 * 23
    assert lrs[0] == 0.05  # the unscaled LR
    assert abs(lrs[23] - 0.1 * 0.5) < 1e-12  # epoch 1: scaled LR x cosine(T_max=2) at epoch 1 = 0.5


def test_command_help_and_unknown_command(capsys):
    from syncstep.cli import main

    assert main([]) == 0
    assert "demo" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
