"""The policy search loop: agents, budgets met, resume, Ray executor == local executor."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from nncompress.engine import ConfigError, TrainConfig, fit
from nncompress.policy import (
    DDPGConfig,
    LocalExecutor,
    Policy,
    ProxyConfig,
    RayExecutor,
    SearchConfig,
    make_executor,
    plot_ratios,
    plot_rewards,
)
from nncompress.prune import prune_filters_
from nncompress.stages.search_model import search_model
from nncompress.stats import count_macs


@pytest.fixture(scope="module")
def trained(digits_data):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(12, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    fit(model, digits_data.loader("train", 64), TrainConfig(epochs=2, lr=0.05))
    return model.eval()


def _cfg(agent="ddpg", episodes=6, **kw):
    return SearchConfig(
        budgets="macs=0.5",
        agent=agent,
        episodes=episodes,
        ddpg=DDPGConfig(warmup=3, hidden1=32, hidden2=32, batch_size=16),
        proxy=ProxyConfig(val_samples=100, calib_samples=32),
        **kw,
    )


def _same(a, b):
    keys = ("episode", "round", "q", "actions", "accuracy", "loss", "reward", "tag")
    return [{k: e[k] for k in keys} for e in a] == [{k: e[k] for k in keys} for e in b]


@pytest.mark.parametrize("agent", ["ddpg", "random", "greedy"])
def test_every_agent_returns_a_policy_that_meets_the_budget(trained, digits_data, agent, tmp_path):
    d = digits_data
    events = []
    res = search_model(trained, d.train, d.val, _cfg(agent), progress=events.append)
    pol = res.policy
    assert isinstance(pol, Policy) and pol.filter and pol.info["agent"] == agent
    assert res.best["fractions"]["macs"] <= 0.5
    x = d.val[0][:2]
    m = __import__("copy").deepcopy(trained)
    prune_filters_(m, pol, x)
    macs = sum(v[0] for v in count_macs(m, (1, 8, 8)).values())
    dense = sum(v[0] for v in count_macs(trained, (1, 8, 8)).values())
    assert macs <= 0.5 * dense
    adv = [e for e in events if e.kind == "advance"]
    assert adv and adv[-1].completed == len(res.episodes)
    assert adv[-1].info["best_reward"] == max(
        e["reward"] for e in res.episodes if e["tag"] != "scan"
    )
    if agent == "greedy":
        assert [e["tag"] for e in res.episodes].count("final") == 1
        assert res.best["tag"] == "final"
        # plots of the search (CLI output)
        rew = plot_rewards(res.episodes, tmp_path / "rewards.png")
        rat = plot_ratios(pol, tmp_path / "ratios.png")
        for p in (rew, rat):
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_continues_the_episode_count(trained, digits_data, tmp_path):
    d = digits_data
    full = search_model(trained, d.train, d.val, _cfg(episodes=8))
    out = tmp_path / "run"
    first = search_model(trained, d.train, d.val, _cfg(episodes=4), out_dir=out)
    assert len(first.episodes) == 4 and first.resumed_episodes == 0
    lines = (out / "episodes.jsonl").read_text().splitlines()
    assert [json.loads(x)["episode"] for x in lines] == [0, 1, 2, 3]
    second = search_model(trained, d.train, d.val, _cfg(episodes=8), out_dir=out)
    assert second.resumed_episodes == 4 and len(second.episodes) == 8
    assert [e["episode"] for e in second.episodes] == list(range(8))
    # the continued search is the uninterrupted one (the agent was replayed exactly)
    assert _same(second.episodes, full.episodes)
    assert Policy.load(out / "policy.json") == second.policy
    # a different search in the same folder is refused before any episode
    with pytest.raises(ConfigError, match="another model or configuration"):
        search_model(trained, d.train, d.val, _cfg(episodes=8, seed=1), out_dir=out)


def test_a_torn_last_line_is_dropped_on_resume(trained, digits_data, tmp_path):
    d = digits_data
    out = tmp_path / "run"
    search_model(trained, d.train, d.val, _cfg(agent="random", episodes=4), out_dir=out)
    with open(out / "episodes.jsonl", "a") as fh:
        fh.write('{"episode": 4, "rou')
    res = search_model(trained, d.train, d.val, _cfg(agent="random", episodes=6), out_dir=out)
    assert res.resumed_episodes == 4 and len(res.episodes) == 6


def test_ray_executor_equals_local_executor(trained, digits_data):
    ray = pytest.importorskip("ray")
    d = digits_data
    cfg = _cfg(episodes=6)
    local = search_model(trained, d.train, d.val, cfg, executor=LocalExecutor())
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ex = RayExecutor(workers=2)
        remote = search_model(trained, d.train, d.val, cfg, executor=ex)
        ex.close()
        assert ray.is_initialized()  # a Ray started by the caller is left running
    finally:
        ray.shutdown()
    assert _same(local.episodes, remote.episodes)
    assert local.policy == remote.policy


def test_a_local_ray_runs_its_workers_in_the_foreground(monkeypatch):
    # Ray's default is nice 15, which starved the search's workers on a busy machine
    pytest.importorskip("ray")
    monkeypatch.delenv("RAY_worker_niceness", raising=False)

    def _niceness(shared, item):  # local: Ray ships it by value (tests/ is not on its path)
        import os

        return {"nice": os.nice(0), "item": item}

    ex = RayExecutor(workers=1)
    ex.start(_niceness, None)
    try:
        out = ex.map([0, 1])
    finally:
        ex.close()
    assert [o["item"] for o in out] == [0, 1]
    assert {o["nice"] for o in out} == {os.nice(0)}
    assert "RAY_worker_niceness" not in os.environ  # restored after the raylet started


def test_bad_executor_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="executor='gpu'"):
        make_executor("gpu")
    with pytest.raises(ConfigError, match="only applies to executor='ray'"):
        make_executor("local", address="auto")
    # without Ray the error says to install it (checked in test_policy_cli)
    pytest.importorskip("ray")
    with pytest.raises(ConfigError, match="no Ray head answers there.*--executor local"):
        RayExecutor(address="127.0.0.1:9").connect()
    with pytest.raises(ConfigError, match="must be 'auto' or HOST:PORT"):
        RayExecutor(address="nowhere").connect()


def test_without_ray_the_error_offers_the_local_executor(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # 'import ray' raises ImportError
    with pytest.raises(ConfigError, match=r"Ray is not installed.*nncompress\[policy\].*local"):
        RayExecutor().connect()


def test_search_config_validation():
    with pytest.raises(ConfigError, match="agent='amc'"):
        SearchConfig(agent="amc")
    with pytest.raises(ConfigError, match="unknown metric"):
        SearchConfig(budgets="flops=0.5")
    with pytest.raises(ConfigError, match="episodes=0"):
        SearchConfig(episodes=0)
    cfg = SearchConfig(actions={"sparsity": True, "filter": False})
    assert cfg.actions.sparsity and not cfg.actions.filter
