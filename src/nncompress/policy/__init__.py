"""Automated compression policy search (AMC, He et al., ECCV 2018; SPEC section 7).

Per-layer ratios (filter pruning per coupled group, connection sparsity, shared-weight bits)
are searched under budgets (MACs, parameters, ``.ncz`` bytes, latency) by a DDPG agent, the
sensitivity-greedy baseline or random search, with a fast accuracy proxy evaluated locally or
as Ray tasks. The result is a :class:`Policy` that ``prune_filters_``, ``prune_`` and
``share_weights_`` accept.

Algorithms (``budget``, ``env``, ``ddpg``, ``agents``, ``search``) are separate from where
candidates run (``executor``). Ray is optional (``pip install 'nncompress[policy]'``) and only
imported when the Ray executor starts.
"""

from .agents import AGENTS, DDPGAgent, GreedyAgent, Proposal, RandomAgent, make_agent
from .budget import METRICS, Budget, CostModel, LatencyModel, fit_latency_model, parse_budgets
from .ddpg import DDPG, DDPGConfig
from .env import ActionsConfig, ActionSpace, CompressionPlan, Rollout, Unit
from .executor import EXECUTORS, Executor, LocalExecutor, RayExecutor, make_executor
from .plots import plot_ratios, plot_rewards
from .policy import POLICY_FORMAT, Policy
from .proxy import ProxyConfig, ProxyData, evaluate_plan, make_proxy_data
from .search import REWARDS, SearchConfig, SearchResult, reward_of, search

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
    "CompressionPlan",
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
    "ProxyData",
    "RandomAgent",
    "RayExecutor",
    "Rollout",
    "SearchConfig",
    "SearchResult",
    "Unit",
    "evaluate_plan",
    "fit_latency_model",
    "make_agent",
    "make_executor",
    "make_proxy_data",
    "parse_budgets",
    "plot_ratios",
    "plot_rewards",
    "reward_of",
    "search",
]
