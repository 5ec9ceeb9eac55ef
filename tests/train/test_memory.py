"""Training-state memory per process: the counts are what DDP, FSDP and EP ranks really hold."""
import pytest

from moelab.config import load_preset
from moelab.model import MoELM
from moelab.train.expert_parallel import place_experts
from moelab.train.memory import parameter_split, state_per_rank


@pytest.mark.parametrize("preset", ["umoe-tiny", "moeut-tiny", "moe-tiny", "mole-tiny"])
def test_counts_equal_the_parameters_each_rank_holds(preset):
    cfg = load_preset(preset).model
    model = MoELM(cfg)
    total = sum(p.numel() for p in model.parameters())
    split = parameter_split(cfg)
    assert split["total"] == total
    st = state_per_rank(cfg, 2)
    assert st["ddp"] == {"params": total, "bytes": 16 * total}
    assert st["fsdp"]["params"] == -(-total // 2)
    if preset == "mole-tiny":  # MoLE's experts run densely: nothing to place
        assert st["ep"] == {"unavailable": "no routed expert bank"}
        return
    place_experts(model, rank=1, world=2)
    assert st["ep"]["params"] == sum(p.numel() for p in model.parameters()) < total


def test_ep_needs_a_world_size_dividing_every_bank():
    cfg = load_preset("moe-tiny").model
    n = parameter_split(cfg)["bank_experts"][0]
    assert state_per_rank(cfg, n + 1)["ep"] == {
        "unavailable": f"{n} experts are not divisible by {n + 1}"}
    with pytest.raises(ValueError, match="world size 0"):
        state_per_rank(cfg, 0)


def test_expert_groups_hold_more_experts_each():
    cfg = load_preset("moe-tiny").model
    split = parameter_split(cfg)
    two = state_per_rank(cfg, 4, ep_size=2)["ep"]["params"]
    assert two == split["replicated"] + split["experts"] // 2
    assert two > state_per_rank(cfg, 4)["ep"]["params"]
    assert state_per_rank(cfg, 4, ep_size=3)["ep"] == {
        "unavailable": "train.ep_size 3 does not divide 4 processes"}
