"""Conditional computation: early-exit networks, model cascades and threshold calibration.

Easy inputs leave early (SPEC section 6; Teerapittayanon et al. 2016 "BranchyNet"; Bolukbasi
et al. 2017 "Adaptive Neural Networks for Efficient Inference"):

* :func:`attach_exits_` puts small heads after named submodules of any model
  (:class:`EarlyExitNet`); :func:`train_exits` trains them jointly (BranchyNet) or alone;
* :class:`Cascade` runs whole models cheapest first;
* :func:`calibrate_` picks the thresholds minimising the expected MACs under an accuracy-loss
  bound on held-out data; :func:`evaluate_exits` reports the exit histogram, per-exit accuracy
  and expected MACs of any split.
"""

from .base import CONFIDENCES, ConditionalModel, ExitPrediction, check_thresholds, confidence
from .calibrate import (
    METHODS,
    CalibrationConfig,
    ExitOutputs,
    calibrate_,
    calibrate_thresholds,
    collect_outputs,
)
from .cascade import CASCADE_FORMAT, Cascade, load_cascade, save_cascade
from .cost import ExitCosts, cascade_costs, exit_costs
from .exits import HEADS, EarlyExitNet, ExitConfig, attach_exits_, make_head
from .report import ExitReport, evaluate_exits
from .train import MODES, ExitTrainConfig, exit_loss, train_exits

__all__ = [
    "CASCADE_FORMAT",
    "CONFIDENCES",
    "HEADS",
    "METHODS",
    "MODES",
    "CalibrationConfig",
    "Cascade",
    "ConditionalModel",
    "EarlyExitNet",
    "ExitConfig",
    "ExitCosts",
    "ExitOutputs",
    "ExitPrediction",
    "ExitReport",
    "ExitTrainConfig",
    "attach_exits_",
    "calibrate_",
    "calibrate_thresholds",
    "cascade_costs",
    "check_thresholds",
    "collect_outputs",
    "confidence",
    "evaluate_exits",
    "exit_costs",
    "exit_loss",
    "load_cascade",
    "make_head",
    "save_cascade",
    "train_exits",
]
