"""Knowledge distillation: Hinton soft targets, attention transfer, relational KD.

``distillation_loss(teacher, DistillConfig(...))`` returns a ``loss_fn`` for
:func:`nncompress.engine.fit`; it is also the label-free fine-tuning loss other methods use.
"""

from .losses import (
    DistillConfig,
    attention_map,
    attention_transfer_loss,
    distillation_loss,
    kd_loss,
    relational_kd_loss,
)

__all__ = [
    "DistillConfig",
    "attention_map",
    "attention_transfer_loss",
    "distillation_loss",
    "kd_loss",
    "relational_kd_loss",
]
