"""snoo.integrations.lightning: with the EvaluationWeights callback Lightning validates SNOO's slow weights, trains
exactly as a plain loop does, ends the fit on the slow weights, and writes checkpoints whose model weights are the
slow weights and from which ``trainer.fit(ckpt_path=...)`` continues the run bit for bit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import snoo

L = pytest.importorskip("lightning")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from snoo.integrations.lightning import EvaluationWeights  # noqa: E402

# 5 batches an epoch and K = 4: the epochs end at steps 5 and 10, in the middle of an outer cycle, so a checkpoint
# at an epoch's end holds fast weights that differ from the slow ones and a half-counted cycle
K, BATCHES, EPOCHS = 4, 5, 3

# Lightning's advice (workers, loggers, ...) and a deprecation inside Lightning itself
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore:.*LeafSpec")]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The model is far too small to gain from threads; one keeps the file fast on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def loader(seed: int, n: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)), batch_size=8)


def train_data() -> DataLoader:
    return loader(1, 8 * BATCHES)


def val_data() -> DataLoader:
    return loader(2, 16)


def make_optimizer(params) -> tuple[snoo.SNOO, torch.optim.lr_scheduler.LRScheduler]:
    opt = snoo.SNOO(torch.optim.AdamW(params, lr=1e-2), k=K, lr=0.7, momentum=0.5)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda n: 1 / (1 + 0.1 * n))


def snapshot(tensors) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


class Regression(L.LightningModule):
    """A tiny regression that records what it sees: the loss of each training step, and at the first batch of each
    validation the parameters beside the optimizer's mode and slow weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        self.losses: dict[int, float] = {}
        self.validations: list[dict[str, Any]] = []

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return (self.net(x) - y).square().mean()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.losses[self.global_step] = loss.item()
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        if batch_idx == 0:
            opt = self.trainer.optimizers[0] if self.trainer.optimizers else None
            self.validations.append(
                {
                    "sanity": self.trainer.sanity_checking,
                    "params": snapshot(self.parameters()),
                    "training": None if opt is None else opt.training,
                    "slow": snapshot(opt.state[p]["slow"] for p in self.parameters()) if opt and opt.state else None,
                }
            )
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self) -> dict[str, Any]:
        opt, sched = make_optimizer(self.parameters())
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def trainer(*callbacks: L.Callback, epochs: int = EPOCHS) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        callbacks=list(callbacks),
    )


def fit(*callbacks: L.Callback, validate: bool = True, ckpt_path: Path | None = None) -> tuple[Regression, L.Trainer]:
    model, run = Regression(), trainer(*callbacks)
    run.fit(model, train_data(), val_data() if validate else None, ckpt_path=ckpt_path)
    return model, run


def opt_weights(opt: snoo.SNOO, name: str) -> list[torch.Tensor]:
    """SNOO's ``slow`` weights, or the ``fast`` ones it keeps in eval mode, in the order of its parameters."""
    return snapshot(opt.state[p][name] for group in opt.param_groups for p in group["params"])


def fast_weights(run: L.Trainer) -> list[torch.Tensor]:
    """The fast weights after a fit with the callback, which leaves the optimizer in eval mode."""
    assert not run.optimizers[0].training
    return opt_weights(run.optimizers[0], "fast")


def loaded_optimizer(state: dict[str, Any], model: torch.nn.Module) -> snoo.SNOO:
    """A checkpoint's optimizer state, loaded into a SNOO built afresh: read it through the public API."""
    opt, _ = make_optimizer(model.parameters())
    opt.load_state_dict(state)
    return opt


@pytest.mark.parametrize("with_callback", [True, False])
def test_validation_runs_on_the_slow_weights(with_callback):
    model, _ = fit(*[EvaluationWeights()] if with_callback else [])
    sanity, *epochs = model.validations
    assert sanity["sanity"] and sanity["slow"] is None  # before the first step the slow weights are the initial ones
    assert len(epochs) == EPOCHS
    # with the callback the optimizer is in eval mode through every validation, the sanity check included
    assert all(seen["training"] is not with_callback for seen in model.validations)
    for seen in epochs:
        assert equal(seen["params"], seen["slow"]) is with_callback  # without it Lightning validates the fast ones


def test_training_is_the_plain_loop_and_ends_on_the_slow_weights():
    model, run = fit(EvaluationWeights())

    plain = Regression()
    opt, sched = make_optimizer(plain.parameters())
    losses = {}
    for step, batch in enumerate(b for _ in range(EPOCHS) for b in train_data()):
        loss = plain.loss(batch)
        losses[step] = loss.item()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()

    # switching to the slow weights for each validation and back leaves the training untouched, bit for bit
    assert model.losses == losses
    assert equal(fast_weights(run), list(plain.parameters()))
    slow = snapshot(opt.state[p]["slow"] for p in plain.parameters())
    assert equal(list(model.parameters()), slow)
    assert not equal(slow, list(plain.parameters()))  # the run ends mid-cycle: the two differ


def test_validate_after_fit_sees_the_slow_weights_and_switches_nothing():
    model, run = fit(EvaluationWeights())
    slow = snapshot(model.parameters())
    model.validations.clear()
    run.validate(model, val_data(), verbose=False)  # the optimizer of the fit is still the trainer's
    trainer(EvaluationWeights()).validate(model, val_data(), verbose=False)  # a trainer that never fitted
    assert [equal(seen["params"], slow) for seen in model.validations] == [True, True]
    assert equal(list(model.parameters()), slow) and not run.optimizers[0].training


class FailsInEpoch3(Regression):
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if self.global_step == 2 * BATCHES + 2:
            raise FloatingPointError("the loss went NaN")
        return super().training_step(batch, batch_idx)


def test_outside_fit_nothing_is_switched(tmp_path):
    """A failed fit leaves its optimizer to the trainer, in training mode: validating a checkpoint afterwards must see
    the checkpoint's weights, not have the optimizer's slow weights copied over them."""
    model, run = FailsInEpoch3(), trainer(EvaluationWeights(), ModelCheckpoint(tmp_path, "{epoch}", save_top_k=-1))
    with pytest.raises(FloatingPointError):
        run.fit(model, train_data(), val_data())
    assert run.optimizers[0].training
    model.validations.clear()
    run.validate(model, val_data(), ckpt_path=tmp_path / "epoch=0.ckpt", verbose=False)
    saved = torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)
    weights = [saved["state_dict"][name] for name, _ in model.named_parameters()]
    assert not equal(weights, opt_weights(run.optimizers[0], "slow"))  # what switching would have put in
    assert equal(model.validations[0]["params"], weights)
    assert run.optimizers[0].training


@pytest.mark.parametrize("validate", [True, False], ids=["saved-after-validation", "saved-while-training"])
def test_checkpoints_hold_the_slow_weights_and_resume_bit_for_bit(tmp_path, validate):
    """With validation, ModelCheckpoint saves when validation ends, with the slow weights already in; without, it
    saves at the end of the epoch, while training, and the callback rewrites the checkpoint."""
    every_epoch = ModelCheckpoint(tmp_path, "{epoch}", save_top_k=-1, save_on_train_epoch_end=not validate)
    callbacks: list[L.Callback] = [EvaluationWeights(), every_epoch]
    if validate:  # the "best model" checkpoint, weights only: Lightning calls no callback for it
        callbacks.append(
            ModelCheckpoint(tmp_path, "weights-{epoch}", monitor="val_loss", save_top_k=-1, save_weights_only=True)
        )
    model, run = fit(*callbacks, validate=validate)

    for epoch in range(EPOCHS - 1):
        saved = torch.load(tmp_path / f"epoch={epoch}.ckpt", weights_only=True)
        weights = [saved["state_dict"][name] for name, _ in model.named_parameters()]
        opt = loaded_optimizer(saved["optimizer_states"][0], Regression())
        slow, fast = opt_weights(opt, "slow"), opt_weights(opt, "fast")
        assert not opt.training  # a state dict saved in eval mode: the training point is kept inside
        assert equal(weights, slow) and not equal(weights, fast)
        assert equal(list(Regression.load_from_checkpoint(tmp_path / f"epoch={epoch}.ckpt").parameters()), slow)
        if validate:
            assert equal(model.validations[1 + epoch]["params"], slow)  # the validated weights
            best = torch.load(tmp_path / f"weights-epoch={epoch}.ckpt", weights_only=True)
            assert "optimizer_states" not in best
            assert equal([best["state_dict"][name] for name, _ in model.named_parameters()], slow)

        resumed, resumed_run = fit(EvaluationWeights(), validate=validate, ckpt_path=tmp_path / f"epoch={epoch}.ckpt")
        done = BATCHES * (epoch + 1)
        assert resumed.losses == {step: loss for step, loss in model.losses.items() if step >= done}
        assert equal(list(resumed.parameters()), list(model.parameters()))
        assert equal(fast_weights(resumed_run), fast_weights(run))
        assert all(equal(seen["params"], seen["slow"]) for seen in resumed.validations)


def test_a_checkpoint_saved_in_eval_mode_needs_the_callback_to_resume(tmp_path):
    run = fit(EvaluationWeights(), ModelCheckpoint(tmp_path, "{epoch}", save_top_k=-1))[1]
    with pytest.raises(RuntimeError, match="eval mode"):
        fit(ckpt_path=tmp_path / "epoch=0.ckpt")
    assert run.optimizers[0].training is False


class TwoOptimizers(Regression):
    """Plain SGD for the first layer and SNOO for the second, stepped by hand: the callback must leave SGD alone and
    rewrite SNOO's entry, the second, of a checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx: int) -> None:
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(self.loss(batch))
        for opt in self.optimizers():
            opt.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        first, second = self.net[0].parameters(), self.net[2].parameters()
        return [torch.optim.SGD(first, lr=0.1, momentum=0.9), make_optimizer(second)[0]]


def test_only_optimizers_with_evaluation_weights_are_switched(tmp_path):
    # Lightning counts the steps of both optimizers: step 10 is the end of the first epoch, in the middle of a cycle
    every_epoch = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=2 * BATCHES, save_top_k=-1)
    model, run = TwoOptimizers(), trainer(EvaluationWeights(), every_epoch)
    run.fit(model, train_data())
    saved = torch.load(tmp_path / "step=10.ckpt", weights_only=True)
    sgd_state, snoo_state = saved["optimizer_states"]
    torch.optim.SGD(Regression().net[0].parameters(), lr=0.1).load_state_dict(sgd_state)  # SGD's, as Lightning saved it
    opt = loaded_optimizer(snoo_state, Regression().net[2])
    assert not opt.training
    second = [saved["state_dict"][name] for name in ("net.2.weight", "net.2.bias")]
    assert equal(second, opt_weights(opt, "slow")) and not equal(second, opt_weights(opt, "fast"))
    resumed, resumed_run = TwoOptimizers(), trainer(EvaluationWeights())
    resumed_run.fit(resumed, train_data(), ckpt_path=tmp_path / "step=10.ckpt")
    assert equal(list(resumed.parameters()), list(model.parameters()))
