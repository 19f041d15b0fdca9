"""Hugging Face ``transformers.Trainer`` (and the Accelerate it runs on) with SNOO.

What Trainer does by itself (read in transformers 5.23 and Accelerate 1.15): ``Trainer.training_step`` calls
``optimizer.train()`` before every forward pass, and ``Trainer.evaluation_loop``, behind ``evaluate()`` and
``predict()``, calls ``optimizer.eval()``; Accelerate's ``AcceleratedOptimizer``, which Trainer puts around the
optimizer, passes both calls on. So Trainer evaluates SNOO's slow weights and trains on the fast ones unaided.

What it does not do is switch before it saves: a checkpoint written during training, and the model that ``train()``
leaves in memory (which ``save_model()`` and ``push_to_hub()`` then write), hold whatever the last step left in the
parameters: the fast weights, unless an evaluation ran just before. :class:`EvaluationWeights` is the
callback that puts the evaluation weights in first. Resume is exact with or without it: the optimizer's state dict
keeps the fast weights and the mode, and the first ``training_step`` after loading calls ``optimizer.train()``.

:func:`create_optimizer` builds SNOO around the inner optimizer that Trainer would build from its arguments.

``import snoo`` does not import this module, so only its users need transformers and accelerate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

try:
    from accelerate.optimizer import AcceleratedOptimizer
    from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_pt_utils import get_parameter_names
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "snoo.integrations.hf needs transformers and accelerate: pip install transformers accelerate"
    ) from e

from snoo.optim.schedules import Coefficient
from snoo.optim.snoo import SNOO

__all__ = ["EvaluationWeights", "create_optimizer"]

# Names (lower-cased) of the parameters that get no weight decay: the patterns of Trainer.get_decay_parameter_names
# (transformers 5), which also leaves out every parameter of an nn.LayerNorm. tests/test_integration_hf.py holds the
# split equal to the installed Trainer's.
_NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def create_optimizer(
    model: nn.Module,
    args: TrainingArguments,
    *,
    k: int = 20,
    outer_lr: Coefficient = 0.7,
    outer_momentum: Coefficient = 0.5,
    nesterov: bool = True,
    state_device: torch.device | str | None = None,
) -> SNOO:
    """SNOO around the optimizer that ``Trainer`` builds from ``args``, to pass as ``optimizers=(opt, None)``.

    The inner optimizer is the one ``args.optim`` names (torch's AdamW by default) with ``args.learning_rate``,
    ``adam_beta1``, ``adam_beta2``, ``adam_epsilon`` and ``optim_args``, over Trainer's two parameter groups:
    ``args.weight_decay`` on the weights, no decay on biases and normalisation weights. Given ``(opt, None)``,
    Trainer builds its learning-rate scheduler (``args.lr_scheduler_type``, warm-up, its own count of steps) on
    ``opt``; SNOO's parameter groups are the inner optimizer's, so that scheduler moves the inner ``lr`` just as it
    would without SNOO. K counts optimizer steps (Trainer's ``global_step``), not micro-batches.

    Args:
        model: the model Trainer will train, already on the device it trains on.
        args: the Trainer's arguments.
        k: inner steps per outer step (SNOO's ``k``).
        outer_lr: SNOO's outer learning rate (its ``lr``), a number or a schedule; ``args.learning_rate`` is the
            inner optimizer's.
        outer_momentum: SNOO's outer momentum (its ``momentum``), a number or a schedule.
        nesterov: Nesterov (the paper) or heavy-ball outer momentum.
        state_device: where the slow weights and momentum live (SNOO's ``state_device``).

    Returns:
        The :class:`snoo.SNOO` optimizer.

    Raises:
        TypeError: when ``model`` is not an ``nn.Module`` or ``args`` not a ``TrainingArguments``.
        ValueError: for an ``args.optim`` whose optimizer chooses its own parameters (GaLore, APOLLO, LOMO,
            layer-wise, the factories of multi-optimizer setups): build that one yourself and pass
            ``snoo.SNOO(inner, ...)`` to Trainer. Also for a schedule-free ``args.optim``, whose own
            ``train()``/``eval()`` SNOO would not call.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(args, TrainingArguments):
        raise TypeError(f"args must be a transformers.TrainingArguments, got {type(args).__name__}")
    inner_cls, inner_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    if not (isinstance(inner_cls, type) and issubclass(inner_cls, Optimizer)) or (
        {"params", "model", "optimizer_dict"} & inner_kwargs.keys()
    ):
        raise ValueError(
            f"args.optim={str(args.optim)!r} builds an optimizer that chooses its own parameters, not one over "
            f"Trainer's parameter groups; build it yourself and pass optimizers=(snoo.SNOO(inner, k=...), None) "
            f"to Trainer"
        )
    if callable(getattr(inner_cls, "eval", None)):
        raise ValueError(
            f"args.optim={str(args.optim)!r} has train() and eval() modes of its own (schedule-free), which SNOO does "
            f"not pass on to the optimizer it wraps; train with it alone, without SNOO"
        )
    decay = set(get_parameter_names(model, [nn.LayerNorm], _NO_DECAY_PATTERNS))
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for name, p in trainable if name in decay], "weight_decay": args.weight_decay},
        {"params": [p for name, p in trainable if name not in decay], "weight_decay": 0.0},
    ]
    inner = inner_cls(groups, **inner_kwargs)
    return SNOO(inner, k=k, lr=outer_lr, momentum=outer_momentum, nesterov=nesterov, state_device=state_device)


class EvaluationWeights(TrainerCallback):
    """Put the optimizer's evaluation weights (SNOO's slow weights) into the model before Trainer saves a checkpoint
    and when training ends: checkpoints, ``save_model()`` and the model ``train()`` leaves behind then hold them.

    ``Trainer(..., optimizers=(opt, sched), callbacks=[EvaluationWeights()])``, for an ``opt`` with ``train()`` and
    ``eval()`` (every wrapper of this package).

    - Before each checkpoint (``on_step_end`` or ``on_epoch_end`` when Trainer is about to save) it calls
      ``optimizer.eval()``. The checkpoint's model files then hold the slow weights, and its ``optimizer.pt`` the
      fast weights with ``training=False``. Trainer's ``optimizer.train()`` at the next training step puts the fast
      weights back exactly, in the run that saved and in one resumed from the checkpoint, so both continue as if
      nothing had been saved. The cost is one copy of the parameters per checkpoint, in memory and in
      ``optimizer.pt``.
    - When training stops (``on_epoch_end``, which Trainer calls after the last step however training stopped) it
      calls ``optimizer.eval()``, so the model holds the evaluation weights when ``train()`` returns. That is before
      Trainer loads the best checkpoint (``load_best_model_at_end``), which then stays in the model.

    A later ``train()`` gets the fast weights back at its first training step. List this callback after any that
    decides in ``on_step_end`` or ``on_epoch_end`` to save or stop: it reads their decision.
    """

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Refuse, with a ``TypeError``, an optimizer without ``train()`` and ``eval()``, before the first step."""
        optimizer = kwargs["optimizer"]
        inner = optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer
        if not (callable(getattr(inner, "train", None)) and callable(getattr(inner, "eval", None))):
            raise TypeError(
                f"EvaluationWeights needs an optimizer with train() and eval(), such as snoo.SNOO; this Trainer's is "
                f"{type(inner).__name__}. Pass optimizers=(snoo.SNOO(...), None) to Trainer, or leave the callback out"
            )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """``optimizer.eval()`` when Trainer is about to save a checkpoint."""
        if control.should_save:
            kwargs["optimizer"].eval()

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """``optimizer.eval()`` when Trainer is about to save a checkpoint or training stops."""
        if control.should_save or control.should_training_stop:
            kwargs["optimizer"].eval()
