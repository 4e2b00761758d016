"""Lightning-style scripts (tests/scripts/lightning_ddp.py) on 2 processes, against references computed
here: the early-stopping epoch from the logged history, the best checkpoint's score, a hand-written
GAN loop, predictions and accuracy computed in one process."""

from __future__ import annotations

import csv
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from common import dataset, make_net
from helpers import SCRIPTS, run

pytest.importorskip("torchmetrics")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lightning")
    run([sys.executable, str(SCRIPTS / "lightning_ddp.py"), str(directory)], timeout=400, cwd=str(directory))
    return directory


def both_ranks(out, name):
    ranks = [torch.load(out / f"{name}.rank{r}.pt", weights_only=False) for r in range(2)]
    return ranks


def test_callbacks_decide_the_same_on_both_ranks_and_match_the_logged_history(out):
    ranks = both_ranks(out, "callbacks")
    log_dir = str(out / "a" / "lit" / "version_0")
    assert [r["log_dir"] for r in ranks] == [log_dir, log_dir] == [r["logger_dir"] for r in ranks]
    for key in ("stopped_epoch", "epoch", "best_path", "best_score"):
        assert ranks[0][key] == ranks[1][key], key
    with open(out / "a" / "lit" / "version_0" / "metrics.csv") as f:
        val = [(int(r["epoch"]), float(r["val_loss"])) for r in csv.DictReader(f) if r.get("val_loss")]
    best, wait, stop = math.inf, 0, None
    for epoch, loss in val:  # EarlyStopping(patience=2, min_delta=0.01), by hand
        if loss < best - 0.01:
            best, wait = loss, 0
        else:
            wait += 1
            if wait >= 2:
                stop = epoch
                break
    assert stop is not None and ranks[0]["stopped_epoch"] == stop == ranks[0]["epoch"]
    best_epoch, best_loss = min(val, key=lambda item: item[1])
    assert ranks[0]["best_score"] == pytest.approx(best_loss, rel=1e-6)
    assert ranks[0]["best_path"].endswith(f"epoch={best_epoch}-val_loss={best_loss:.4f}.ckpt")


def test_load_from_checkpoint_rebuilds_the_best_model(out):
    sys.path.insert(0, str(SCRIPTS))
    from lightning_ddp import Classifier

    best = torch.load(out / "callbacks.rank0.pt", weights_only=False)
    model = Classifier.load_from_checkpoint(best["best_path"])
    assert dict(model.hparams) == {"lr": 0.1, "hidden": 16}
    x, y = dataset(20, seed=1)[:]
    with torch.no_grad():
        assert F.cross_entropy(model(x), y).item() == pytest.approx(best["best_score"], rel=1e-5)


def test_gan_with_manual_optimization_equals_a_hand_written_loop(out):
    ranks = both_ranks(out, "gan")
    for key in ranks[0]["params"]:
        assert torch.equal(ranks[0]["params"][key], ranks[1]["params"][key]), key
    assert ranks[0]["steps"] == 8  # 4 batches x 2 optimizers
    sys.path.insert(0, str(SCRIPTS))
    from lightning_ddp import GAN, gan_data

    model = GAN()  # the same initial weights (seeded in __init__)
    gen, disc = model.generator, model.discriminator
    opt_g, opt_d = torch.optim.Adam(gen.parameters(), lr=0.01), torch.optim.Adam(disc.parameters(), lr=0.02)
    data = gan_data()
    for step in range(4):  # global batch 8 = 2 processes x 4
        noise, real = data[step * 8:(step + 1) * 8]
        fake = gen(noise).detach()
        d_loss = (F.binary_cross_entropy_with_logits(disc(real), torch.ones(8, 1))
                  + F.binary_cross_entropy_with_logits(disc(fake), torch.zeros(8, 1)))
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        opt_g.zero_grad()
        F.binary_cross_entropy_with_logits(disc(gen(noise)), torch.ones(8, 1)).backward()
        opt_g.step()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ranks[0]["params"][key], value, atol=1e-5, rtol=0, msg=key)


def test_predict_on_two_processes_returns_every_sample_once_in_order(out):
    ranks = both_ranks(out, "predict")
    net = make_net()
    net.load_state_dict({k.removeprefix("net."): v for k, v in ranks[0]["params"].items()})
    x, _ = dataset(11, seed=4)[:]
    with torch.no_grad():
        expected = net(x)
    for rank in ranks:
        assert [len(b) for b in rank["predictions"]] == [2, 2, 2, 2, 2, 1]
        torch.testing.assert_close(torch.cat(rank["predictions"]), expected, atol=1e-6, rtol=0)
    # The writer on each rank saw that rank's shard: samples r, r + 2, ...; together every sample once.
    indices = [[i for batch, _ in rank["seen"] for i in batch] for rank in ranks]
    assert indices == [list(range(0, 11, 2)), list(range(1, 11, 2))]
    for rank in ranks:
        for batch, prediction in rank["seen"]:
            torch.testing.assert_close(prediction, expected[batch], atol=1e-6, rtol=0)


def test_torchmetrics_accuracy_over_both_ranks_counts_every_sample_once(out):
    ranks = both_ranks(out, "torchmetrics")
    net = make_net()
    net.load_state_dict(ranks[0]["params"])
    x, y = dataset(13, seed=2)[:]
    with torch.no_grad():
        expected = (net(x).argmax(1) == y).float().mean().item()
    for rank in ranks:
        assert rank["results"][0]["val_acc"] == pytest.approx(expected, abs=1e-6)
