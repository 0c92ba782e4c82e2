import pytest
import torch
from hypothesis import given, settings, strategies as st

from sqc.runtime.layout import PackedLinear, col_dtype_for, pack_codes, unpack_codes, words_per_row


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    rows=st.sampled_from([1, 3, 7]),
    cols=st.sampled_from([1, 3, 31, 32, 33, 100]),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(bits, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g)
    words = pack_codes(codes, bits)
    assert words.dtype == torch.int32
    assert words.shape == (rows, words_per_row(cols, bits))
    assert torch.equal(unpack_codes(words, bits, cols), codes)


def test_documented_bit_positions():
    # 4 bits: code i at bits 4*(i%8) of word i//8
    codes = torch.zeros(1, 32, dtype=torch.long)
    codes[0, 9] = 0xA  # word 1, bits 4..7
    w = pack_codes(codes, 4)
    assert w.shape == (1, 4)
    assert int(w[0, 1]) == 0xA << 4 and int(w[0, 0]) == 0
    # 3 bits: 32 codes in 3 words; code 10 straddles words 0 and 1 (stream bits 30..32)
    codes = torch.zeros(1, 32, dtype=torch.long)
    codes[0, 10] = 0b111
    w = pack_codes(codes, 3)
    assert w.shape == (1, 3)
    assert int(w[0, 0]) & 0xFFFFFFFF == 0b11 << 30
    assert int(w[0, 1]) == 0b1
    # 8 bits: one code per byte
    codes = torch.arange(4).view(1, 4) + 0xF0
    w = pack_codes(codes, 8)
    assert int(w[0, 0]) & 0xFFFFFFFF == 0xF3F2F1F0


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([[8]]), 3)
    with pytest.raises(ValueError, match="2..8"):
        pack_codes(torch.tensor([[0]]), 9)


def test_col_dtype_is_narrow():
    assert col_dtype_for(256) == torch.uint8
    assert col_dtype_for(257) == torch.int16
    assert col_dtype_for(11008) == torch.int16
    assert col_dtype_for(40000) == torch.int32


def test_packed_linear_validates():
    bad = dict(bits=3, in_features=33, out_features=2, codes=torch.zeros(2, 5, dtype=torch.int32),
               lut=torch.zeros(2, 8), crow=torch.zeros(3, dtype=torch.int32),
               col=torch.zeros(0, dtype=torch.uint8), val=torch.zeros(0))
    with pytest.raises(ValueError, match="codes"):
        PackedLinear(**bad)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_in_row_chunks_equals_one_piece(monkeypatch, bits):
    import sqc.runtime.layout as layout
    from sqc.runtime.cpu.lanes import from_lane_words, to_lane_words

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (37, 70), generator=g)
    whole = pack_codes(codes, bits), to_lane_words(codes, bits, 16)
    monkeypatch.setattr(layout, "_CHUNK_CODES", 100)  # a few rows per chunk, a last short one
    assert len(layout.row_chunks(37, 96)) == 37
    words, lanes = pack_codes(codes, bits), to_lane_words(codes, bits, 16)
    assert torch.equal(words, whole[0]) and torch.equal(lanes, whole[1])
    assert torch.equal(unpack_codes(words, bits, 70), codes)
    assert torch.equal(from_lane_words(lanes, bits, 16, 37, 70), codes)
    # lane word l of block n holds code t of column n*16*per + t*16 + l at bits t*bits
    per = 32 // bits
    u = lanes.to(torch.int64) & 0xFFFFFFFF
    r, n, lane = 5, 0, 3
    t = min(per - 1, (70 - 1 - lane) // 16)
    assert int(u[r, n * 16 + lane] >> (t * bits)) & ((1 << bits) - 1) == int(codes[r, n * 16 * per + t * 16 + lane])


def test_codes_must_be_integers():
    with pytest.raises(ValueError, match="integers"):
        pack_codes(torch.zeros(2, 3), 3)
