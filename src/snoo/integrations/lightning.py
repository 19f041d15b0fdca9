"""Lightning: validate, checkpoint and finish training on the evaluation weights of snoo's optimizers.

Lightning (2.6) never calls an optimizer's ``train()`` or ``eval()``: its loops switch the *module* between train and
eval mode (``LightningModule.on_validation_model_eval`` and friends) and leave the optimizers alone. With SNOO the
parameters hold the fast weights during training, so without help Lightning validates the fast weights, its
checkpoints hold them as the model's weights, and ``load_from_checkpoint`` hands back a model that is not the one SNOO
trains (the slow weights). The checkpoints still resume exactly: the optimizer's state dict holds everything else.

:class:`EvaluationWeights` is the callback that fills the gap::

    trainer = lightning.Trainer(callbacks=[EvaluationWeights()], ...)

An optimizer takes part when it has ``train()``, ``eval()`` and a boolean ``training``, as every snoo wrapper has;
the others (a plain AdamW beside SNOO, say) are left alone.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.trainer.states import TrainerFn
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "snoo.integrations.lightning needs Lightning 2 (the `lightning` package): pip install lightning"
    ) from e

__all__ = ["EvaluationWeights"]


def _keeps_evaluation_weights(opt: torch.optim.Optimizer) -> bool:
    """Whether ``opt`` keeps evaluation weights apart from the training point, with snoo's train()/eval()."""
    return (
        isinstance(getattr(opt, "training", None), bool)
        and callable(getattr(opt, "train", None))
        and callable(getattr(opt, "eval", None))
    )


def _with_evaluation_weights(trainer: pl.Trainer) -> list[torch.optim.Optimizer]:
    return [opt for opt in trainer.optimizers if _keeps_evaluation_weights(opt)]


class EvaluationWeights(pl.Callback):
    """Put the optimizers' evaluation weights (SNOO's slow weights) into the model wherever Lightning looks at it.

    During ``trainer.fit``:

    - **Validation**, the sanity check included, runs on the evaluation weights: ``opt.eval()`` at the start of
      validation. The fast weights come back (``opt.train()``) at the start of the next training batch, not at the
      end of validation, so that a checkpoint written when validation ends (``ModelCheckpoint`` with a ``monitor``,
      the usual "best model") holds the weights that earned the score, in a weights-only checkpoint too.
    - **Checkpoints** written while training hold the evaluation weights as the model's ``state_dict`` and the
      optimizer's state dict as ``opt.eval()`` leaves it (the training point kept inside, ``training=False``), so
      ``load_from_checkpoint`` gives the model to evaluate or export, and ``trainer.fit(ckpt_path=...)`` with this
      callback continues the run bit for bit: the first training batch puts the fast weights back. This costs one
      ``eval()``/``train()`` round trip and a copy of the model's state dict per checkpoint.
      Weights-only checkpoints written outside validation (``ModelCheckpoint(every_n_train_steps=..,
      save_weights_only=True)``) cannot be fixed this way, because Lightning calls no callback for them: they hold
      the fast weights.
    - **When training ends** the model keeps the evaluation weights, so what follows the fit (``trainer.validate``,
      ``trainer.test``, ``trainer.predict``, ``torch.save(model.state_dict())``, export) sees the model that counts.
      The optimizer stays in eval mode and keeps the fast weights, so ``trainer.save_checkpoint`` after the fit still
      writes a checkpoint that resumes exactly.

    Outside ``fit`` the callback switches nothing: ``validate``/``test``/``predict`` use the weights the model holds,
    which are the evaluation weights after a fit with this callback and the checkpoint's after ``ckpt_path=...``.

    A checkpoint written with this callback resumes only with it: without it the optimizer stays in eval mode and
    its ``step()`` raises.
    """

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``opt.eval()`` for each optimizer with evaluation weights, when validating within ``fit``."""
        if trainer.state.fn == TrainerFn.FITTING:
            for opt in _with_evaluation_weights(trainer):
                opt.eval()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """``opt.train()``: the fast weights back before the batch (after validation or a resume)."""
        for opt in _with_evaluation_weights(trainer):
            opt.train()  # a no-op but for the first batch after validation or after resuming

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``opt.eval()``: the model keeps the evaluation weights after the fit."""
        # here, not in on_fit_end: Lightning's teardown between the two moves model and optimizer state to the CPU
        for opt in _with_evaluation_weights(trainer):
            opt.eval()

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Write the evaluation weights as the model's ``state_dict`` and each optimizer's state as ``eval()`` leaves
        it; the optimizers that were training go back to training after."""
        training = [
            (i, opt) for i, opt in enumerate(trainer.optimizers) if _keeps_evaluation_weights(opt) and opt.training
        ]
        if not training:
            return  # written in eval mode (at the end of validation, after the fit): already what we want
        for _, opt in training:
            opt.eval()
        try:
            model_state = trainer.strategy.lightning_module_state_dict()
            # the tensors of a state dict are the parameters themselves, which train() overwrites below
            for key, value in model_state.items():
                if isinstance(value, torch.Tensor):
                    model_state[key] = value.clone()
            checkpoint["state_dict"] = model_state
            for i, opt in training:
                checkpoint["optimizer_states"][i] = trainer.strategy.optimizer_state(opt)
        finally:
            for _, opt in training:
                opt.train()
