"""SNOO under Lightning: validate the slow weights, checkpoint, resume bit for bit, load the model for inference.

    python examples/lightning_fit.py

A small MLP learns a random teacher network. ``configure_optimizers`` returns SNOO around AdamW with a cosine
schedule; the ``EvaluationWeights`` callback makes Lightning validate and save SNOO's slow weights. The script then
resumes the run from its first checkpoint and checks that it ends exactly where the uninterrupted run ended.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import snoo

try:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from snoo.integrations.lightning import EvaluationWeights
except ImportError as missing:
    name = missing.name or getattr(missing.__cause__, "name", None)  # snoo.integrations re-raises with a cause
    raise SystemExit(
        f'{Path(__file__).name} needs the integrations extra ({name} is missing): pip install -e ".[integrations]"'
    ) from None

EPOCHS, BATCHES, K = 4, 16, 10  # 64 steps: 6 outer steps; every epoch ends in the middle of an outer cycle


def teacher_data(seed: int, n: int) -> DataLoader:
    with torch.random.fork_rng():  # one teacher for every split, without touching the global RNG
        torch.manual_seed(1234)
        teacher = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    with torch.no_grad():
        y = teacher(x) + 0.01 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=32)


class Regression(L.LightningModule):
    def __init__(self, lr: float = 3e-3, k: int = K) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 1))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        inner = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
        opt = snoo.SNOO(inner, k=self.hparams.k, lr=0.7, momentum=0.5)
        # the scheduler is built on SNOO: its param_groups are AdamW's, so this moves AdamW's lr
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS * BATCHES)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def trainer(checkpoints: Path) -> L.Trainer:
    return L.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        callbacks=[EvaluationWeights(), ModelCheckpoint(checkpoints, "{epoch}", monitor="val_loss", save_top_k=-1)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def val_loss(model: Regression, data: DataLoader) -> float:
    with torch.no_grad():
        total = sum(nn.functional.mse_loss(model.net(x), y, reduction="sum").item() for x, y in data)
    return total / len(data.dataset)


def main() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    # Lightning's own advice, not about SNOO (the resumed run writes its checkpoints beside the first run's)
    for advice in (".*does not have many workers.*", ".*LeafSpec.*", ".*exists and is not empty.*"):
        warnings.filterwarnings("ignore", advice)
    torch.set_num_threads(1)
    train, val = teacher_data(0, 32 * BATCHES), teacher_data(1, 256)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = Path(tmp)
        model, run = Regression(), trainer(checkpoints)
        print(f"before training: val loss {val_loss(model, val):.6f}")
        run.fit(model, train, val)
        opt = run.optimizers[0]
        print(f"fit: {run.global_step} steps, {run.global_step // K} outer steps of SNOO(k={K})")
        print(f"  the model now holds the slow weights:  val loss {val_loss(model, val):.6f}")
        opt.train()  # the fast weights, to compare; the callback left the optimizer in eval mode
        print(f"  the fast weights (opt.train()):         val loss {val_loss(model, val):.6f}")
        opt.eval()
        final = [p.detach().clone() for p in model.parameters()]

        first = checkpoints / "epoch=0.ckpt"
        loaded = Regression.load_from_checkpoint(first)
        saved_slow = opt_state_slow(first)
        same = all(torch.equal(a, b) for a, b in zip(loaded.parameters(), saved_slow))
        print(f"load_from_checkpoint({first.name}) gives the slow weights of step {BATCHES}: {same}")

        resumed, resumed_run = Regression(), trainer(checkpoints)
        resumed_run.fit(resumed, train, val, ckpt_path=first)
        same = all(torch.equal(a, b) for a, b in zip(resumed.parameters(), final))
        print(f"fit(ckpt_path={first.name}) ends on exactly the same weights as the uninterrupted run: {same}")


def opt_state_slow(checkpoint: Path) -> list[torch.Tensor]:
    """SNOO's slow weights as a checkpoint's optimizer state holds them, read back through SNOO itself."""
    model = Regression()
    opt = model.configure_optimizers()["optimizer"]
    opt.load_state_dict(torch.load(checkpoint, weights_only=True)["optimizer_states"][0])
    return [opt.state[p]["slow"] for p in model.parameters()]


if __name__ == "__main__":
    main()
