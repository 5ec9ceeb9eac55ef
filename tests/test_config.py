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
