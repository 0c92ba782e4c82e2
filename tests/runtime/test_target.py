import pytest

from sqc.runtime.target import parse_target


@pytest.mark.parametrize(
    "spec,want",
    [
        ("llvm", {"kind": "llvm"}),
        ("llvm -mcpu=znver4", {"kind": "llvm", "mcpu": "znver4"}),
        ("cuda -arch=sm_86", {"kind": "cuda", "arch": "sm_86"}),
        ({"kind": "cuda", "arch": "sm_90"}, {"kind": "cuda", "arch": "sm_90"}),
        (None, {"kind": "llvm"}),
        ("cpu", {"kind": "llvm"}),
        ("cpu -mcpu=znver4", {"kind": "llvm", "mcpu": "znver4"}),
        ({"kind": "cpu"}, {"kind": "llvm"}),
    ],
)
def test_cli_strings_and_dicts(spec, want):
    t = parse_target(spec)
    assert t.as_dict() == want
    assert parse_target(str(t)) == t  # the CLI form round-trips


@pytest.mark.parametrize(
    "spec,msg",
    [
        ("metal", "unknown target"),
        ("cuda -arch", "not of the form -key=value"),
        ("cuda -arch=86", "sm_86"),
        ("cuda -arch=sm_75", "need sm_80 or newer"),
        ({"kind": "cuda", "arch": "sm_70"}, "need sm_80 or newer"),
        ({"arch": "sm_86"}, "needs 'kind'"),
        (3, "must be a string"),
    ],
)
def test_bad_targets(spec, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        parse_target(spec)
