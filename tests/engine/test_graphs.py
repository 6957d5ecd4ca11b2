"""Host-side pieces of the step graphs that need no GPU: the prefill kernel's tile grid."""

import random

from inlaid.kernels.prefill_tiles import BLOCK_M, tile_bound, tile_lists


def test_the_tile_grid_of_a_bucket_holds_every_split_of_its_tokens():
    """A prefill graph's grid is fixed per token bucket: however a step splits its tokens into
    chunks (at most max_chunks of them, each >= 1 token), its tiles must fit in the bound, some
    split must need all of it (a looser bound launches idle programs), and each tile must start
    inside its chunk."""
    rng = random.Random(0)
    for tokens in (1, 5, 16, 63, 64, 65, 128, 300, 2048):
        for max_chunks in (1, 4, 64, 256):
            bound = tile_bound(tokens, max_chunks)
            k = min(max_chunks, tokens)
            # many tiles: chunks one token past a multiple of the tile, the rest of one token each
            splits = [[1] * (k - 1) + [tokens - (k - 1)],
                      [BLOCK_M + 1] * ((tokens - k) // BLOCK_M) + [1] * (k - (tokens - k) // BLOCK_M)]
            for _ in range(200):
                cuts = sorted(rng.sample(range(1, tokens), rng.randint(1, k) - 1))
                splits.append([b - a for a, b in zip([0] + cuts, cuts + [tokens])])
            most = 0
            for lens in splits:
                if sum(lens) != tokens or len(lens) > k or min(lens) < 1:
                    continue  # a hand-made split that does not fit this (tokens, max_chunks)
                tiles, firsts = tile_lists(lens)
                assert len(tiles) <= bound, (tokens, max_chunks, lens)
                most = max(most, len(tiles))
                assert all(0 <= f < lens[c] for c, f in zip(tiles, firsts))
                assert sum(1 for c in tiles if c == 0) == -(-lens[0] // BLOCK_M)
            assert most == bound, (tokens, max_chunks)
