from moelab.compare.summary import (CLOSE_REL, ORDERINGS, architecture, missing_orderings,
                                    ordering_table, seed_table, verdict)


def _rows(**ppl_by_preset):
    """rows like compare.json's: preset -> list of per-seed perplexities."""
    return [{"preset": p.replace("_", "-"), "seed": s, "val_ppl": v}
            for p, vals in ppl_by_preset.items() for s, v in enumerate(vals)]


def _ordering(a, b):
    return next(o for o in ORDERINGS if (o.a, o.b) == (a, b))


def test_architecture_strips_the_size_suffix():
    assert architecture("umoe-att-tiny") == "umoe-att" and architecture("dense") == "dense"


def test_verdicts_account_for_seed_spread():
    lt = _ordering("umoe", "umoe-att")
    assert verdict(lt, [10.0], [11.0]) == "holds (1 seed)"
    assert verdict(lt, [12.0], [11.0]) == "reversed (1 seed)"
    assert verdict(lt, [10.0, 10.2], [11.0, 11.3]) == "holds, beyond the seed spread"
    assert verdict(lt, [11.5, 11.6], [11.0, 11.3]) == "reversed, beyond the seed spread"
    assert verdict(lt, [10.9, 11.2], [11.0, 11.4]) == "holds on the means, within the seed spread"
    assert verdict(lt, [11.1, 11.4], [11.0, 11.3]) == "reversed on the means, within the seed spread"
    le = _ordering("umoe-att", "moe")
    assert verdict(le, [11.1, 11.4], [11.0, 11.3]) == "holds: equal within the seed spread"
    assert verdict(le, [12.0, 12.1], [11.0, 11.3]) == "reversed, beyond the seed spread"
    close = _ordering("mole", "moe")
    assert verdict(close, [100 * (1 + CLOSE_REL / 2)], [100.0]).startswith("holds (1 seed)")
    assert verdict(close, [110.0, 111.0], [100.0, 101.0]) == "does not hold: 10.0% apart"


def test_ordering_table_lists_only_testable_orderings():
    rows = _rows(dense_tiny=[120.0, 122.0], moe_tiny=[110.0, 111.0], gated_tiny=[125.0])
    lines = ordering_table(rows)
    assert lines[0].startswith("| ordering |")
    body = "\n".join(lines[2:])
    assert "| moe < dense | 110.50 (110.00-111.00, 2 seeds) | 121.00 (120.00-122.00, 2 seeds) | -8.7% " \
           "| holds, beyond the seed spread |" in body
    assert "| gated < dense | 125.00 |" in body and "reversed (1 seed)" in body
    assert len(lines) == 4
    assert "umoe < umoe-att" in missing_orderings(rows) and "moe < dense" not in missing_orderings(rows)
    assert ordering_table(_rows(sigma_moe_tiny=[1.0])) == []


def test_seed_table_only_when_some_preset_has_seeds():
    assert seed_table(_rows(dense_tiny=[120.0], moe_tiny=[110.0])) == []
    lines = seed_table(_rows(dense_tiny=[120.0, 123.0], moe_tiny=[110.0]))
    assert lines[2] == "| moe-tiny | 0 | 110.00 | 110.00 | 110.00 | 0.00 |"
    assert lines[3] == "| dense-tiny | 0,1 | 121.50 | 120.00 | 123.00 | 3.00 |"
