import json

import pytest

from moelab.config import Config, load_preset, preset_names, resolve_config
from moelab.errors import ConfigError


def test_presets_load_and_validate():
    names = preset_names()
    assert {"dense-tiny", "gated-tiny", "gated-paper-1.7b"} <= set(names)
    for n in names:
        assert load_preset(n).name == n


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip(tmp_path, suffix):
    cfg = load_preset("gated-tiny").with_overrides(
        ["model.attention.n_kv_heads=2", "model.attention.gate.granularity=headwise",
         "train.lr=3e-4", "model.norm.kind=layernorm"])
    path = tmp_path / f"cfg{suffix}"
    cfg.save(path)
    again = Config.load(path)
    assert again == cfg
    if suffix == ".json":
        assert json.loads(path.read_text())["model"]["attention"]["n_kv_heads"] == 2


def test_a_bare_model_config_file_loads_as_the_model(tmp_path):
    (tmp_path / "bare.json").write_text('{"d_model": 64}')
    cfg = Config.load(tmp_path / "bare.json")
    assert cfg.model.d_model == 64 and cfg.train == Config().train


def test_overrides_are_typed():
    cfg = load_preset("dense-tiny").with_overrides(["train.batch_size=8", "model.d_model=96",
                                                    "model.attention.n_heads=4"])
    assert cfg.train.batch_size == 8 and cfg.model.d_model == 96 and cfg.model.head_dim == 24


BAD = [
    # (override, words that must be in the message)
    ({"model": {"d_modle": 64}}, ["unknown key 'model.d_modle'", "did you mean 'model.d_model'"]),
    ({"model": {"attention": {"n_heads": 5}}}, ["model.attention.n_heads", "5", "d_model=192"]),
    ({"model": {"attention": {"n_kv_heads": 4}}}, ["model.attention.n_kv_heads", "4", "allowed"]),
    ({"model": {"ffn": {"n_experts": 4, "top_k": 6}}}, ["model.ffn.top_k", "6", "1..4"]),
    ({"model": {"attention": {"n_experts": 8, "top_k": 9}}}, ["model.attention.top_k", "9"]),
    ({"model": {"d_model": -8}}, ["model.d_model", "-8", "positive"]),
    ({"model": {"ffn": {"kind": "moee"}}}, ["model.ffn.kind", "'moee'", "allowed", "dense"]),
    ({"model": {"attention": {"kind": "flash"}}}, ["model.attention.kind", "'flash'"]),
    ({"model": {"attention": {"gate": {"position": "g1"}}}}, ["gate.position", "sdpa"]),
    ({"model": {"ffn": {"activation": "swish"}}}, ["model.ffn.activation", "silu"]),
    ({"model": {"n_layers": 4, "sharing": {"group_size": 3}}}, ["sharing.group_size", "3", "n_layers=4"]),
    ({"model": {"attention": {"rope_fraction": 1.5}}}, ["rope_fraction", "1.5"]),
    ({"model": {"tie_embeddings": "yes"}}, ["model.tie_embeddings", "true or false"]),
    ({"model": {"vocab_size": 12.5}}, ["model.vocab_size", "integer"]),
    ({"train": {"batch_size": 6, "grad_accum": 4}}, ["train.grad_accum", "batch_size=6"]),
    ({"train": {"dtype": "fp8"}}, ["train.dtype", "bfloat16"]),
    ({"train": {"seq_len": 4096}}, ["train.seq_len", "max_seq_len"]),
    ({"model": {"norm": {"scheme": "post"}}}, ["model.norm.scheme", "peri"]),
    ({"model": {"router": {"kind": "hash"}}}, ["model.router.kind", "softmax_topk"]),
    ({"model": {"moe_backend": "cuda"}}, ["model.moe_backend", "grouped_mm"]),
]


def _merge(base, over):
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


@pytest.mark.parametrize("over,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_configs_have_clear_messages(over, words):
    d = _merge(load_preset("gated-tiny").to_dict(), over)
    with pytest.raises(ConfigError) as e:
        Config.from_dict(d)
    msg = str(e.value)
    for w in words:
        assert w in msg, (w, msg)
    assert "\n" not in msg


def test_bad_configs_messages_are_distinct():
    msgs = set()
    for over, _ in BAD:
        with pytest.raises(ConfigError) as e:
            Config.from_dict(_merge(load_preset("gated-tiny").to_dict(), over))
        msgs.add(str(e.value))
    assert len(msgs) == len(BAD)


def test_resolve_errors(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'gated-tiny'"):
        resolve_config("gated-tny")
    with pytest.raises(ConfigError, match="not found"):
        resolve_config(config_file=str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        resolve_config(config_file=str(bad))
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        resolve_config("dense-tiny", sets=["train.lr"])
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        resolve_config("dense-tiny", sets=["train.lrr=1"])


# Every size field of the attention and FFN parts, at the values that break layers: a config
# that validates must also build and run (the kinds' check_config classmethods, called by
# ModelConfig.validate, refuse the rest). Fails if a kind's constructor or forward raises.
SIZE_FIELDS = [f"model.{part}.{name}" for part in ("attention", "ffn")
               for name in ("n_experts", "top_k", "n_shared_experts", "expert_dim", "q_rank",
                            "n_kv_heads", "head_dim", "d_ff", "shared_expert_dim")]

ONE_BREAKS = ("n_experts", "top_k", "n_kv_heads")  # fields where 1 is also an edge case


@pytest.mark.parametrize("preset", [p for p in preset_names() if p.endswith("-tiny")])
def test_a_config_that_validates_also_builds_and_runs(preset):
    import torch

    from moelab.model import MoELM

    small = ["model.d_model=48", "model.n_layers=2", "model.vocab_size=64",
             "model.max_seq_len=16", "train.seq_len=8"]
    base = load_preset(preset).with_overrides(small)
    refused = 0
    for key in SIZE_FIELDS:
        for value in (0, 1) if key.rsplit(".", 1)[1] in ONE_BREAKS else (0,):
            try:
                cfg = base.with_overrides([f"{key}={value}"])
            except ConfigError as e:
                assert "\n" not in str(e) and key.rsplit(".", 1)[0] in str(e), str(e)
                refused += 1
                continue
            torch.manual_seed(0)
            model = MoELM(cfg.model)
            x_BT = torch.randint(0, 64, (2, 8))
            model(x_BT, x_BT).loss.backward()
    assert refused > 0  # every tiny preset has a size some value of which is refused


@pytest.mark.parametrize("kind,sets,words", [
    ("moe", ["model.ffn.n_experts=0"], ["model.ffn.n_experts: 0", "at least one routed expert"]),
    ("moe", ["model.ffn.top_k=0"], ["model.ffn.top_k: 0", "1..8"]),
    ("sigma_moe", ["model.ffn.top_k=0"], ["model.ffn.top_k: 0"]),
    ("mole", ["model.ffn.n_experts=0"], ["model.ffn.n_experts: 0"]),
    ("mole", ["model.router.bias_rate=0.01"], ["model.router.bias_rate", "every expert"]),
    ("umoe_ffn", ["model.ffn.gated=true"], ["umoe_ffn", "gated=True"]),
])
def test_ffn_kinds_refuse_sizes_they_cannot_build_at_config_time(kind, sets, words):
    base = load_preset("moe-tiny").with_overrides(
        [f"model.ffn.kind={kind}", "model.ffn.gated=false", "model.ffn.n_experts=8",
         "model.ffn.top_k=2"])
    with pytest.raises(ConfigError) as e:
        base.with_overrides(sets)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("kind", ["switchhead", "moa", "umoe_att"])
@pytest.mark.parametrize("field,value", [("n_experts", 0), ("top_k", 0)])
def test_attention_expert_kinds_refuse_at_config_time(kind, field, value):
    base = load_preset("moa-tiny").with_overrides([f"model.attention.kind={kind}"])
    with pytest.raises(ConfigError, match=f"model.attention.{field}: {value}"):
        base.with_overrides([f"model.attention.{field}={value}"])


def test_umoe_attention_and_ffn_banks_must_match_at_config_time():
    with pytest.raises(ConfigError, match="share one expert bank"):
        load_preset("umoe-tiny").with_overrides(["model.ffn.expert_dim=7"])
