"""The paged decode attention kernel's split count (host side, no GPU needed)."""

from inlaid.kernels.decode_splits import MAX_SPLITS, SPLIT_TARGET, decode_splits


def test_splits_fill_the_grid_up_to_the_target():
    # Llama-2-7B (32 KV heads), contexts up to 4,096 tokens in 16-token blocks, 64-token tiles
    assert decode_splits(32, 32, 256, 16, 64) == 1  # 1,024 programs already
    assert decode_splits(8, 32, 256, 16, 64) == 1  # 256: at the target
    assert decode_splits(4, 32, 256, 16, 64) == 2
    assert decode_splits(1, 32, 256, 16, 64) == MAX_SPLITS
    for batch in (1, 3, 8, 17, 32, 100):
        splits = decode_splits(batch, 8, 256, 16, 64)
        assert splits & (splits - 1) == 0 and 1 <= splits <= MAX_SPLITS
        assert splits == MAX_SPLITS or batch * 8 * splits >= SPLIT_TARGET
        assert splits == 1 or batch * 8 * splits // 2 < SPLIT_TARGET


def test_no_more_splits_than_tiles_of_the_longest_context():
    assert decode_splits(1, 8, 4, 16, 64) == 1  # 64 tokens: one tile
    assert decode_splits(1, 8, 8, 16, 64) == 2  # 128 tokens: two tiles
    assert decode_splits(1, 8, 12, 16, 64) == 2  # 192 tokens: three tiles, splits stay a power of 2
    assert decode_splits(1, 8, 0, 16, 64) == 1


def test_launch_is_compact_only_past_one_wave_of_the_default():
    from inlaid.kernels.decode_splits import COMPACT_LAUNCH, DEFAULT_LAUNCH, DEFAULT_RESIDENT, decode_launch

    sms = 132  # an H100: 528 programs at the default launch
    assert decode_launch(32 * 32, sms) == COMPACT_LAUNCH  # batch 32 of Llama-2-7B: two waves otherwise
    assert decode_launch(DEFAULT_RESIDENT * sms + 1, sms) == COMPACT_LAUNCH
    assert decode_launch(DEFAULT_RESIDENT * sms, sms) == DEFAULT_LAUNCH  # one wave already
    assert decode_launch(8 * 32, sms) == DEFAULT_LAUNCH
    assert decode_launch(10 ** 6, None) == DEFAULT_LAUNCH  # not a GPU (the interpreter)
    tile, stages, maxnreg = COMPACT_LAUNCH
    assert tile & (tile - 1) == 0 and tile >= 16 and stages >= 1 and maxnreg > 0
