"""Reference models: parameter counts, forward shapes, registry."""

from __future__ import annotations

import pytest
import torch

from nncompress.models import MODELS, create, list_models


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_lenet_300_100_param_count():
    # 784*300+300 + 300*100+100 + 100*10+10
    assert 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10 == 266_610
    assert n_params(create("lenet-300-100")) == 266_610


def test_lenet5_param_count():
    # conv1 20*1*5*5+20, conv2 50*20*5*5+50, fc1 800*500+500, fc2 500*10+10
    hand = (20 * 25 + 20) + (50 * 20 * 25 + 50) + (800 * 500 + 500) + (500 * 10 + 10)
    assert hand == 431_080
    assert n_params(create("lenet-5")) == 431_080


@pytest.mark.parametrize("depth,blocks", [(20, 3), (56, 9)])
def test_resnet_forward_on_28x28(depth, blocks):
    model = create(f"resnet-{depth}").eval()
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == blocks
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    # 1 stem + 2 per block + 2 projection shortcuts
    assert len(convs) == 1 + 2 * 3 * blocks + 2


def test_resnet_rejects_bad_depth():
    with pytest.raises(ValueError, match="depth=21"):
        create("resnet-20").__class__(depth=21)


IMAGE_MODELS = sorted(n for n in MODELS if n != "char-gpt")  # char-gpt: test_zoo_transformers


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_every_registry_model_forward_and_backward(name):
    torch.manual_seed(0)
    model = create(name, num_classes=7)
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_models_adapt_to_8x8_input():
    x = torch.randn(2, 1, 8, 8)
    assert create("lenet-300-100", in_features=64)(x).shape == (2, 10)
    assert create("resnet-20")(x).shape == (2, 10)
    assert create("vgg-small", image_size=8)(x).shape == (2, 10)


def test_registry_lists_and_rejects():
    assert [m.name for m in list_models()] == list(MODELS)
    with pytest.raises(ValueError, match="model='alexnet'"):
        create("alexnet")
    with pytest.raises(ValueError, match="unknown argument"):
        create("lenet-5", nonsense=1)


def test_default_kwargs_fit_the_dataset_from_the_registry():
    from nncompress.models import default_kwargs

    assert default_kwargs("lenet-300-100", (1, 8, 8), 10) == {"num_classes": 10, "in_features": 64}
    assert default_kwargs("lenet-5", (1, 28, 28), 10) == {
        "num_classes": 10,
        "in_channels": 1,
        "image_size": 28,
    }
    assert default_kwargs("resnet-20", (3, 32, 32), 7) == {"num_classes": 7, "in_channels": 3}
    for name in IMAGE_MODELS:  # every image model builds from its defaults for a tiny dataset
        create(name, **default_kwargs(name, (1, 28, 28), 10))
    with pytest.raises(ValueError, match="language model"):
        default_kwargs("char-gpt", (1, 28, 28), 10)
