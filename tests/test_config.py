import pytest
from hypothesis import given, strategies as st

from sqc.config import PRESETS, QuantConfig, TableDType, resolve_config


@pytest.mark.parametrize("bits", [1, 9, 0, -3, 2.5, True])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits must be an integer in 2..8"):
        QuantConfig(bits=bits)


@pytest.mark.parametrize("field", ["outlier_pct", "sensitive_pct"])
@pytest.mark.parametrize("value", [-0.1, 10.01, float("nan"), 50])
def test_bad_percentages(field, value):
    with pytest.raises(ValueError, match=f"{field}.*\\[0, 10\\]"):
        QuantConfig(**{field: value})


def test_frozen():
    cfg = QuantConfig()
    with pytest.raises(Exception):
        cfg.bits = 4


def test_bad_table_dtype_lists_valid():
    with pytest.raises(ValueError, match="float16"):
        QuantConfig(table_dtype="int8")


@given(
    bits=st.integers(2, 8),
    o=st.floats(0, 10),
    s=st.floats(0, 10),
    t=st.sampled_from(list(TableDType)),
    skip=st.lists(st.text(min_size=1, max_size=5), max_size=3),
)
def test_json_round_trip(bits, o, s, t, skip):
    cfg = QuantConfig(bits=bits, outlier_pct=o, sensitive_pct=s, table_dtype=t, skip=tuple(skip))
    assert QuantConfig.from_json(cfg.to_json()) == cfg


def test_presets():
    assert resolve_config("w3-s0.45") == QuantConfig(bits=3, outlier_pct=0.40, sensitive_pct=0.05)
    assert resolve_config("w4").sparse_pct == 0
    uniform = {"w4", "w3", "w4-s0.45", "w3-s0.45"}
    budgets = {"b2.5", "b3", "b3.25", "b3.5", "b4", "b4.5"}
    assert set(PRESETS) == {p + g for p in uniform | budgets for g in ("", "-g")}
    for name in budgets:
        assert PRESETS[name].bits_per_weight == float(name[1:]) and PRESETS[name].sparse_pct == pytest.approx(0.45)
    assert all(PRESETS[name].bits_per_weight is None for name in uniform)
    with pytest.raises(ValueError, match="valid presets: w4, w3"):
        resolve_config("w5")
    assert resolve_config({"bits": 4}).bits == 4


def test_future_version_refused():
    with pytest.raises(ValueError, match="upgrade sqc"):
        QuantConfig.from_dict({"version": 99})


def test_unknown_field_refused():
    with pytest.raises(ValueError, match="unknown QuantConfig fields"):
        QuantConfig.from_dict({"bitz": 3})


def test_guided_fit_mode_and_presets():
    from sqc.config import FitMode

    for base in ("w4", "w3", "w4-s0.45", "w3-s0.45"):
        g = PRESETS[base + "-g"]
        assert g.fit is FitMode.GUIDED and g.replace(fit="kmeans") == PRESETS[base]
        assert QuantConfig.from_json(g.to_json()) == g
    assert QuantConfig().fit is FitMode.KMEANS
    # an artifact written before the field existed still reads
    old = PRESETS["w3"].to_dict()
    for k in ("fit", "guided_iters", "guided_damp"):
        old.pop(k)
    assert QuantConfig.from_dict(old) == PRESETS["w3"]
    # a stored config from before guided_shrink was fitted without it; a new config shrinks by default
    old = PRESETS["w3-g"].to_dict()
    old.pop("guided_shrink")
    assert QuantConfig.from_dict(old).guided_shrink == 0.0 and PRESETS["w3-g"].guided_shrink == 0.5
    assert QuantConfig.from_dict({"bits": 3}).guided_shrink == 0.5  # a user's dict is not a stored config
    with pytest.raises(ValueError, match="guided_shrink must be a number in"):
        QuantConfig(guided_shrink=1.5)
    with pytest.raises(ValueError, match="fit 'gptq' is not one of: kmeans, guided"):
        QuantConfig(fit="gptq")
    with pytest.raises(ValueError, match="guided_damp"):
        QuantConfig(guided_damp=0)
    with pytest.raises(ValueError, match="guided_iters"):
        QuantConfig(guided_iters=-1)
