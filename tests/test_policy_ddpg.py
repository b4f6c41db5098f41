"""AMC's DDPG agent: a step lowers the critic loss, noise stays in [0, 1], seeded runs repeat."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nncompress.engine import ConfigError
from nncompress.policy import DDPG, DDPGConfig


def _batch(n: int = 64, f: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    s = rng.uniform(size=(n, f))
    a = rng.uniform(size=(n, 1))
    r = -((a - 0.3) ** 2)  # a reward the critic can learn
    s2 = rng.uniform(size=(n, f))
    done = np.ones((n, 1))  # terminal: the TD target is the reward itself
    return s, a, r, s2, done


def test_a_ddpg_step_on_a_fixed_replay_batch_lowers_the_critic_loss():
    agent = DDPG(12, 5, DDPGConfig(hidden1=32, hidden2=32), seed=0)
    batch = _batch()
    before = agent.critic_loss(batch)
    losses = [agent.update(batch)[0] for _ in range(5)]
    after = agent.critic_loss(batch)
    assert after < before
    assert losses[0] == pytest.approx(before)  # the step reports the loss it started from
    # non-terminal transitions: the target also uses the target networks
    batch2 = _batch(seed=1)[:4] + (np.zeros((64, 1)),)
    before2 = agent.critic_loss(batch2)
    agent.update(batch2)
    assert agent.critic_loss(batch2) < before2


def test_exploration_noise_is_truncated_and_decays():
    agent = DDPG(4, 3, DDPGConfig(warmup=10, init_delta=0.5, delta_decay=0.9), seed=0)
    assert agent.sigma(0) == agent.sigma(10) == 0.5
    assert agent.sigma(12) == pytest.approx(0.5 * 0.81)
    s = np.full(4, 0.5)
    acts = [agent.act(s, 2.0) for _ in range(200)]
    assert min(acts) >= 0.0 and max(acts) <= 1.0
    mu = agent.act(s, None)
    assert 0.0 < mu < 1.0


def test_ddpg_is_reproducible_from_its_seed():
    def run(seed):
        agent = DDPG(12, 4, DDPGConfig(hidden1=16, hidden2=16, batch_size=8), seed=seed)
        for i in range(3):
            states = np.random.default_rng(i).uniform(size=(4, 12))
            acts = np.array([agent.act(x, 0.3) for x in states])
            agent.remember(states, acts, -0.1 * i)
            agent.update()
        return agent.act(np.full(12, 0.2), None), [
            p.detach().clone() for p in agent.actor.parameters()
        ]

    a, pa = run(3)
    b, pb = run(3)
    assert a == b and all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    c, _ = run(4)
    assert c != a


def test_ddpg_config_validation():
    with pytest.raises(ConfigError, match="ddpg.tau=0: must be in"):
        DDPGConfig(tau=0)
    with pytest.raises(ConfigError, match="ddpg.hidden1"):
        DDPGConfig(hidden1=0)
