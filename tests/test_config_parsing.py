"""moelab.config_parsing on small dataclasses of its own (the config tests cover it through
`Config`): keys, types and the messages that name the field."""
from dataclasses import dataclass, field
from typing import Optional

import pytest

from moelab.config_parsing import (build, check_choice, check_non_negative, check_positive,
                                   divisors, read_mapping, set_dotted)
from moelab.errors import ConfigError


@dataclass
class Inner:
    width: int = 4
    rate: float = 0.5


@dataclass
class Outer:
    name: str = "x"
    flag: bool = False
    size: Optional[int] = None
    inner: Inner = field(default_factory=Inner)
    tags: list = field(default_factory=list)


def test_build_coerces_and_nests():
    o = build(Outer, {"name": "a", "flag": True, "size": 3.0, "inner": {"rate": "3e-4"},
                      "tags": [1, 2]}, "")
    assert o == Outer("a", True, 3, Inner(4, 3e-4), [1, 2])
    assert isinstance(o.size, int) and isinstance(o.inner.rate, float)
    assert build(Outer, None, "") == Outer()
    assert build(Outer, {"size": None}, "").size is None


def test_build_copies_free_values():
    tags = [[1]]
    o = build(Outer, {"tags": tags}, "")
    tags[0].append(2)
    assert o.tags == [[1]]


@pytest.mark.parametrize("d, needle", [
    ({"inner": {"widht": 2}}, "unknown key 'model.inner.widht'; did you mean 'model.inner.width'?"),
    ({"flag": 1}, "model.flag: expected true or false, got 1"),
    ({"size": 2.5}, "model.size: expected an integer, got 2.5"),
    ({"size": True}, "model.size: expected an integer, got True"),
    ({"inner": {"rate": "fast"}}, "model.inner.rate: expected a number, got 'fast'"),
    ({"inner": {"rate": float("nan")}}, "model.inner.rate: expected a finite number"),
    ({"name": 3}, "model.name: expected a string, got 3"),
    ({"inner": [1]}, "model.inner: expected a mapping, got list [1]"),
])
def test_build_names_the_field(d, needle):
    with pytest.raises(ConfigError) as e:
        build(Outer, d, "model")
    assert needle in str(e.value)


def test_set_dotted():
    d = {"train": {"lr": 1.0}}
    set_dotted(d, "train.lr", 2.0)
    set_dotted(d, "train.new_key", 1)  # unknown leaves are left for build() to report
    assert d == {"train": {"lr": 2.0, "new_key": 1}}
    with pytest.raises(ConfigError, match="unknown key 'trian'; did you mean 'train'"):
        set_dotted(d, "trian.lr", 1)
    with pytest.raises(ConfigError, match="'train.lr' is not a section"):
        set_dotted(d, "train.lr.x", 1)


def test_checks():
    check_choice("a.b", "silu", ("silu", "gelu"))
    with pytest.raises(ConfigError, match=r"a.b: 'sulu' is not allowed \(did you mean 'silu'\?\)"):
        check_choice("a.b", "sulu", ("silu", "gelu"))
    check_positive("a.n", 1)
    check_non_negative("a.n", 0)
    for bad in (0, -1, None):
        with pytest.raises(ConfigError, match="a.n: .* must be a positive number"):
            check_positive("a.n", bad)
    with pytest.raises(ConfigError, match="a.n: -1 must be >= 0"):
        check_non_negative("a.n", -1)
    assert divisors(12) == [1, 2, 3, 4, 6, 12]


def test_read_mapping(tmp_path):
    (tmp_path / "bare.json").write_text('{"d_model": 64}')
    assert read_mapping(tmp_path / "bare.json") == {"d_model": 64}
    (tmp_path / "full.yaml").write_text("train:\n  lr: 0.1\n")
    assert read_mapping(tmp_path / "full.yaml") == {"train": {"lr": 0.1}}
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping at the top level"):
        read_mapping(tmp_path / "list.yaml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="bad.json: cannot parse"):
        read_mapping(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="missing.yaml: not found"):
        read_mapping(tmp_path / "missing.yaml")
