"""Spill: tensors written to an unlinked temporary file and mapped back keep their values, stay
writable, and leave the resident set on evict()."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sqc.runtime.spill import Spill

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int16, torch.uint8, torch.int64]


@settings(max_examples=40, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=3), min_size=1, max_size=5),
       dtypes=st.lists(st.sampled_from(DTYPES), min_size=5, max_size=5), seed=st.integers(0, 2**16))
def test_put_many_gives_back_the_same_values_dtypes_and_shapes(shapes, dtypes, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}": (torch.randn(s, generator=g) * 100).to(dtypes[i]) for i, s in enumerate(shapes)}
    spill = Spill()
    out = spill.put_many(tensors)
    assert list(out) == list(tensors)
    for k, t in tensors.items():
        assert out[k].dtype == t.dtype and out[k].shape == t.shape
        assert torch.equal(out[k], t), k
        assert spill.holds(out[k]) == (t.numel() > 0)
    spill.evict()
    for k, t in tensors.items():  # evicted pages come back from the file
        assert torch.equal(out[k], t), k
    assert spill.nbytes % 4096 == 0


def test_a_mapped_tensor_is_returned_as_is_and_a_view_is_held():
    spill = Spill()
    a = spill.put(torch.arange(1000, dtype=torch.int32).reshape(10, 100))
    assert spill.put(a) is a
    assert spill.holds(a[3:5]) and not spill.holds(torch.zeros(4))
    before = spill.nbytes
    assert spill.put(a[2:]).data_ptr() == a[2:].data_ptr() and spill.nbytes == before


def test_writes_into_a_mapped_tensor_survive_evict():
    spill = Spill()
    t = spill.put(torch.zeros(5000))
    t[17] = 3.5
    t[4999] = -1.0
    spill.evict()
    assert float(t[17]) == 3.5 and float(t[4999]) == -1.0 and float(t.sum()) == 2.5


def test_only_cpu_tensors_go_in():
    with pytest.raises(ValueError, match="meta"):
        Spill().put(torch.empty(3, device="meta"))


def _rss_file_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def test_evict_takes_the_pages_out_of_the_resident_set():
    spill = Spill()
    t = spill.put(torch.ones(32 << 20, dtype=torch.uint8))  # 32 MiB
    base = _rss_file_kib()
    assert int(t.sum()) == 32 << 20  # reading maps every page
    touched = _rss_file_kib()
    assert touched - base > 24 << 10
    spill.evict()
    assert _rss_file_kib() - base < 8 << 10
    assert int(t[::4096].sum()) == 8192  # and the values are still there


def test_the_file_is_unlinked(tmp_path):
    spill = Spill(str(tmp_path))
    spill.put(torch.ones(100))
    assert list(tmp_path.iterdir()) == []
    assert np.isclose(float(spill.put(torch.full((3,), 2.0)).sum()), 6.0)


def test_a_folder_that_cannot_hold_it_is_named(tmp_path):
    with pytest.raises(OSError, match="SQC_SPILL_DIR"):
        Spill(str(tmp_path / "missing"))
