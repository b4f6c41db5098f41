"""Knowledge distillation: Hinton soft targets, attention transfer, relational KD, and
distillation of any output (hidden states, pooled embeddings: MSE / cosine / KL).

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
from .outputs import OutputDistillConfig, output_distillation_loss, output_loss

__all__ = [
    "OutputDistillConfig",
    "output_distillation_loss",
    "output_loss",
    "DistillConfig",
    "attention_map",
    "attention_transfer_loss",
    "distillation_loss",
    "kd_loss",
    "relational_kd_loss",
]
