"""Automated compression policy search (AMC, He et al., ECCV 2018; SPEC section 7).

Per-layer ratios (filter pruning per coupled group, connection sparsity, shared-weight bits)
are searched under budgets (MACs, parameters, ``.ncz`` bytes, latency) by a DDPG agent, the
sensitivity-greedy baseline or random search, with a fast accuracy proxy evaluated locally or
as Ray tasks. The result is a :class:`Policy` (defined in :mod:`nncompress.core`) that
``prune_filters_``, ``prune_`` and ``share_weights_`` accept.

Algorithms (``budget``, ``units``, ``env``, ``ddpg``, ``agents``, ``search``) are separate from
where candidates run (``executor``) and from the model: the search drives a
:class:`SearchProblem`; :mod:`nncompress.stages.search_model` builds one from a model
(families do not import each other) and ``search_model(model, train, val, config)`` runs it.
Ray is optional (``pip install 'nncompress[policy]'``) and only imported when the Ray
executor starts.
"""

from ..core.policy import POLICY_FORMAT, Policy
from .agents import AGENTS, DDPGAgent, GreedyAgent, Proposal, RandomAgent, make_agent
from .budget import METRICS, Budget, CostModel, LatencyModel, parse_budgets
from .ddpg import DDPG, DDPGConfig
from .env import ActionsConfig, ActionSpace, Rollout, Unit
from .executor import EXECUTORS, Executor, LocalExecutor, RayExecutor, make_executor
from .plots import plot_ratios, plot_rewards
from .proxy import ProxyConfig
from .search import REWARDS, SearchConfig, SearchProblem, SearchResult, reward_of, search

__all__ = [
    "AGENTS",
    "DDPG",
    "EXECUTORS",
    "METRICS",
    "POLICY_FORMAT",
    "REWARDS",
    "ActionSpace",
    "ActionsConfig",
    "Budget",
    "CostModel",
    "DDPGAgent",
    "DDPGConfig",
    "Executor",
    "GreedyAgent",
    "LatencyModel",
    "LocalExecutor",
    "Policy",
    "Proposal",
    "ProxyConfig",
    "RandomAgent",
    "RayExecutor",
    "Rollout",
    "SearchConfig",
    "SearchProblem",
    "SearchResult",
    "Unit",
    "make_agent",
    "make_executor",
    "parse_budgets",
    "plot_ratios",
    "plot_rewards",
    "reward_of",
    "search",
]
