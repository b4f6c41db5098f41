"""DDPG agent of AMC (He et al., ECCV 2018, section 3.4; Lillicrap et al. 2016).

Actor ``mu(s) in [0, 1]`` and critic ``Q(s, a)``: two MLPs with ``hidden1``/``hidden2`` ReLU
units (AMC: 300 and 300; the critic adds the state and action projections before the first
ReLU). Training follows AMC:

- exploration: during ``warmup`` episodes actions are uniform in [0, 1]; afterwards the
  actor's action plus truncated-normal noise ``TN(mu(s), sigma^2, 0, 1)`` with
  ``sigma = init_delta * delta_decay ** (episode - warmup)`` (0.5 and 0.95 in AMC);
- every transition of an episode gets the episode's final reward (the reward only exists
  once the whole model is compressed) and ``discount = 1``;
- rewards are centred by a moving average of the batch means ("baseline", alpha 0.5);
- critic: ``L = mean (r + gamma * Q'(s', mu'(s')) * (1 - done) - Q(s, a))^2``; actor:
  maximise ``Q(s, mu(s))``; Adam with 1e-3 (critic) and 1e-4 (actor); soft target updates
  with ``tau = 0.01``; one update per stored transition once the warm-up is over.

All randomness comes from ``seed`` (network init, minibatches, noise), so a search is
reproducible and can be resumed by replaying its log.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import nn

from ..core.errors import ConfigError

__all__ = ["DDPG", "Actor", "Critic", "DDPGConfig", "ReplayMemory"]


@dataclass(frozen=True)
class DDPGConfig:
    """Hyper-parameters of the AMC agent (defaults: AMC's search script)."""

    hidden1: int = 300
    hidden2: int = 300
    lr_actor: float = 1e-4
    lr_critic: float = 1e-3
    batch_size: int = 64
    memory_per_unit: int = 100
    tau: float = 0.01
    discount: float = 1.0
    init_delta: float = 0.5
    delta_decay: float = 0.95
    warmup: int = 100
    baseline_alpha: float = 0.5

    def __post_init__(self) -> None:
        for name in ("hidden1", "hidden2", "batch_size", "memory_per_unit"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"ddpg.{name}={v!r}: must be an integer >= 1")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"ddpg.warmup={self.warmup!r}: must be an integer >= 0")
        for name in ("lr_actor", "lr_critic", "init_delta"):
            v = getattr(self, name)
            if not v > 0:
                raise ConfigError(f"ddpg.{name}={v!r}: must be > 0")
        for name in ("tau", "delta_decay", "baseline_alpha"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ConfigError(f"ddpg.{name}={v!r}: must be in (0, 1]")
        if not 0 <= self.discount <= 1:
            raise ConfigError(f"ddpg.discount={self.discount!r}: must be in [0, 1]")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Actor(nn.Module):
    """``s -> sigmoid(W3 relu(W2 relu(W1 s)))``: one action in [0, 1]."""

    def __init__(self, n_states: int, hidden1: int = 300, hidden2: int = 300) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_states, hidden1),
            nn.ReLU(),
            nn.Linear(hidden1, hidden2),
            nn.ReLU(),
            nn.Linear(hidden2, 1),
            nn.Sigmoid(),
        )

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.net(s)  # (B, 1)


class Critic(nn.Module):
    """``Q(s, a) = W3 relu(W2 relu(W_s s + W_a a))``."""

    def __init__(self, n_states: int, hidden1: int = 300, hidden2: int = 300) -> None:
        super().__init__()
        self.fs = nn.Linear(n_states, hidden1)
        self.fa = nn.Linear(1, hidden1)
        self.head = nn.Sequential(
            nn.ReLU(), nn.Linear(hidden1, hidden2), nn.ReLU(), nn.Linear(hidden2, 1)
        )

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.head(self.fs(s) + self.fa(a))  # (B, 1)


class ReplayMemory:
    """Ring buffer of ``(s, a, r, s', done)`` transitions (float64 numpy arrays)."""

    def __init__(self, limit: int, n_states: int) -> None:
        self.limit = limit
        self.s = np.zeros((limit, n_states))
        self.a = np.zeros((limit, 1))
        self.r = np.zeros((limit, 1))
        self.s2 = np.zeros((limit, n_states))
        self.done = np.zeros((limit, 1))
        self.size = 0
        self._next = 0

    def append(self, s: np.ndarray, a: float, r: float, s2: np.ndarray, done: bool) -> None:
        i = self._next
        self.s[i], self.a[i, 0], self.r[i, 0], self.s2[i], self.done[i, 0] = s, a, r, s2, done
        self._next = (i + 1) % self.limit
        self.size = min(self.size + 1, self.limit)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        idx = rng.integers(0, self.size, size=n)
        return self.s[idx], self.a[idx], self.r[idx].copy(), self.s2[idx], self.done[idx]


class DDPG:
    """The agent: acts on layer embeddings, learns from episodes (see the module docstring).

    Parameters
    ----------
    n_states : length of the layer embedding.
    n_units : units per episode (sizes the replay memory: ``memory_per_unit * n_units``).
    config : :class:`DDPGConfig`.
    seed : seeds network init, minibatch sampling and exploration noise.
    """

    def __init__(
        self, n_states: int, n_units: int, config: DDPGConfig | None = None, seed: int = 0
    ) -> None:
        self.config = cfg = config or DDPGConfig()
        self.rng = np.random.default_rng(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.actor = Actor(n_states, cfg.hidden1, cfg.hidden2).double()
            self.actor_target = Actor(n_states, cfg.hidden1, cfg.hidden2).double()
            self.critic = Critic(n_states, cfg.hidden1, cfg.hidden2).double()
            self.critic_target = Critic(n_states, cfg.hidden1, cfg.hidden2).double()
        self.actor_target.load_state_dict(self.actor.state_dict())
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.actor_optim = torch.optim.Adam(self.actor.parameters(), lr=cfg.lr_actor)
        self.critic_optim = torch.optim.Adam(self.critic.parameters(), lr=cfg.lr_critic)
        self.memory = ReplayMemory(cfg.memory_per_unit * max(n_units, 1), n_states)
        self.moving_average: float | None = None
        self.updates = 0

    # ---- acting ----------------------------------------------------------------------------

    def sigma(self, episode: int) -> float:
        """Exploration noise of ``episode`` (decays after the warm-up)."""
        c = self.config
        return c.init_delta * c.delta_decay ** max(0, episode - c.warmup)

    @torch.no_grad()
    def act(self, state: np.ndarray, sigma: float | None) -> float:
        """``mu(s)``, plus truncated-normal noise in [0, 1] when ``sigma`` is given."""
        s = torch.as_tensor(np.asarray(state, dtype=np.float64)[None])  # (1, F)
        mu = float(self.actor(s)[0, 0])
        if not sigma:
            return mu
        a, b = (0.0 - mu) / sigma, (1.0 - mu) / sigma
        x = stats.truncnorm.rvs(a, b, loc=mu, scale=sigma, random_state=self.rng)
        return float(np.clip(x, 0.0, 1.0))

    def random_action(self) -> float:
        return float(self.rng.uniform(0.0, 1.0))

    # ---- learning ----------------------------------------------------------------------------

    def remember(self, states: np.ndarray, actions: np.ndarray, reward: float) -> None:
        """Store an episode: every transition gets the final ``reward`` (AMC)."""
        n = len(states)
        for t in range(n):
            done = t == n - 1
            s2 = states[t] if done else states[t + 1]
            self.memory.append(states[t], float(actions[t]), reward, s2, done)

    def _targets(self, s2: torch.Tensor, r: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            q2 = self.critic_target(s2, self.actor_target(s2))  # (B, 1)
        return r + self.config.discount * (1.0 - done) * q2

    def critic_loss(self, batch: tuple[np.ndarray, ...]) -> float:
        """MSE of the critic against the TD targets on ``batch`` (rewards as given)."""
        s, a, r, s2, done = (torch.as_tensor(x) for x in batch)
        with torch.no_grad():
            y = self._targets(s2, r, done)
            return float(((self.critic(s, a) - y) ** 2).mean())

    def update(self, batch: tuple[np.ndarray, ...] | None = None) -> tuple[float, float]:
        """One DDPG step on ``batch`` (default: a minibatch sampled from the memory, rewards
        centred by the moving-average baseline). Returns ``(critic loss, actor loss)``."""
        cfg = self.config
        if batch is None:
            if self.memory.size == 0:
                return 0.0, 0.0
            batch = self.memory.sample(cfg.batch_size, self.rng)
            s, a, r, s2, done = batch
            mean = float(r.mean())
            if self.moving_average is None:
                self.moving_average = mean
            else:
                self.moving_average += cfg.baseline_alpha * (mean - self.moving_average)
            r = r - self.moving_average
            batch = (s, a, r, s2, done)
        s, a, r, s2, done = (torch.as_tensor(x) for x in batch)
        y = self._targets(s2, r, done)
        self.critic_optim.zero_grad()
        value_loss = ((self.critic(s, a) - y) ** 2).mean()
        value_loss.backward()
        self.critic_optim.step()
        self.actor_optim.zero_grad()
        policy_loss = -self.critic(s, self.actor(s)).mean()
        policy_loss.backward()
        self.actor_optim.step()
        with torch.no_grad():
            for tgt, src in ((self.actor_target, self.actor), (self.critic_target, self.critic)):
                for pt, ps in zip(tgt.parameters(), src.parameters(), strict=True):
                    pt.mul_(1.0 - cfg.tau).add_(ps, alpha=cfg.tau)
        self.updates += 1
        return float(value_loss.detach()), float(policy_loss.detach())
