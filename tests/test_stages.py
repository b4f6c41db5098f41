"""The stage-config pattern: family config + shared retraining spec, one registry, resume hooks."""

from __future__ import annotations

import pytest
import torch

from nncompress.core import ConfigError
from nncompress.distill import DistillConfig
from nncompress.engine import TrainConfig
from nncompress.prune import MagnitudeConfig, prune_, pruning_masks
from nncompress.quant import KMeansConfig, share_weights_, shared_layers
from nncompress.stages import STAGES, RetrainSpec, StageConfig, stage_entry


def test_every_registered_stage_follows_the_pattern():
    for name in STAGES:
        cls, run = stage_entry(name)
        assert issubclass(cls, StageConfig) and callable(run), name
        defaults = cls.defaults()
        assert set(defaults) <= set(cls.keys()), name


def test_stage_fields_come_from_the_family_config_and_the_retrain_spec():
    from nncompress.stages.prune import PruneStageConfig
    from nncompress.stages.share import ShareStageConfig

    cfg = PruneStageConfig(sparsity=0.8, exclude=["fc3"], epochs=2, lr_scale=0.5,
                           distill={"temperature": 3})  # fmt: skip
    assert cfg.algorithm == MagnitudeConfig(sparsity=0.8, exclude=("fc3",))
    assert cfg.exclude == ("fc3",)  # normalised by MagnitudeConfig
    assert cfg.retrain == RetrainSpec(epochs=2, lr_scale=0.5, distill=DistillConfig(3))
    assert cfg.to_dict()["distill"] == {"temperature": 3}  # the mapping as written
    share = ShareStageConfig(bits_fc=4)
    assert share.algorithm == KMeansConfig(bits_fc=4) and share.retrain is None
    # every KMeansConfig field is a stage key with the same default
    assert set(KMeansConfig.__dataclass_fields__) <= set(ShareStageConfig.keys())


def test_retrain_spec_is_validated_once_and_names_the_stage_key():
    from nncompress.stages.decompose import DecomposeStageConfig
    from nncompress.stages.quantize import QuantizeStageConfig

    with pytest.raises(ConfigError, match=r"^lr_scale=0: must be a number in \(0, 100\]"):
        RetrainSpec(lr_scale=0)
    with pytest.raises(ConfigError, match=r"^augment=1: must be true, false or null"):
        RetrainSpec(augment=1)
    with pytest.raises(ConfigError, match=r"^finetune_epochs=-2"):
        DecomposeStageConfig(method="svd", rank=2, finetune_epochs=-2)
    with pytest.raises(ConfigError, match=r"^qat_epochs=0"):
        QuantizeStageConfig(qat_epochs=0)
    base = TrainConfig(epochs=9, lr=0.2, augment=True)
    got = RetrainSpec(epochs=2, augment=False, l1=1e-5).train_config(base)
    assert got == base.replace(epochs=2, augment=False, l1=1e-5)
    q = QuantizeStageConfig(method="qat", qat_epochs=3, activations="none")
    assert q.retrain.epochs == 3 and q.activations is None
    assert q.algorithm.observer == "moving_average" and q.observer == "minmax"


def test_capped_and_round_trip():
    from nncompress.stages.decompose import DecomposeStageConfig
    from nncompress.stages.train import TrainStageConfig

    d = DecomposeStageConfig.from_dict({"method": "cp", "rank": 3, "finetune_epochs": 5})
    assert d.capped(1).finetune_epochs == 1 and d.capped(9) is d
    assert DecomposeStageConfig.from_dict(d.to_dict()) == d
    t = TrainStageConfig.from_dict({"epochs": 7, "lr": 0.01})
    assert t.capped(2).overrides == {"epochs": 2, "lr": 0.01}
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['epoch'\]"):
        DecomposeStageConfig.from_dict({"method": "svd", "rank": 1, "epoch": 1})


def test_resume_hooks_rebuild_masks_and_codebooks_from_folded_weights():
    from nncompress.core import folded_copy
    from nncompress.stages.prune import PruneStageConfig
    from nncompress.stages.share import ShareStageConfig

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    prune_(net, MagnitudeConfig(sparsity=0.5))
    share_weights_(net, KMeansConfig(bits_fc=2))
    x = torch.randn(4, 8)
    plain = folded_copy(net)  # what a checkpoint holds
    for cfg in (PruneStageConfig(sparsity=0.5), ShareStageConfig(bits_fc=2)):
        cfg.resume_(plain)
    assert set(pruning_masks(plain)) == {"0", "2"} and set(shared_layers(plain)) == {"0", "2"}
    assert torch.equal(plain(x), net(x))


def test_prune_sensitivity_target_beyond_the_grid_fails_at_config_time():
    from nncompress.prune.sensitivity import DEFAULT_SPARSITIES
    from nncompress.stages.prune import PruneStageConfig

    with pytest.raises(ConfigError, match=r"sparsity=0.96.*sensitivity_sparsities"):
        PruneStageConfig(sparsity=0.96, allocate="sensitivity")
    assert max(DEFAULT_SPARSITIES) < 0.96
    grid = (*DEFAULT_SPARSITIES, 0.97, 0.98, 0.99)
    cfg = PruneStageConfig(sparsity=0.96, allocate="sensitivity", sensitivity_sparsities=grid)
    assert cfg.sensitivity_sparsities == grid
    PruneStageConfig(sparsity=0.95, allocate="sensitivity")  # on the grid's last point: fine
