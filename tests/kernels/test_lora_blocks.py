"""The LoRA shrink's block rule (Triton-free: runs on the CPU)."""

from inlaid.kernels.lora_blocks import shrink_config


def test_decode_splits_k_over_16_programs_up_to_16_tokens_then_8():
    # Llama-2-7B's shrink inputs: hidden 4096 (q/k/v, o, gate/up) and intermediate 11008 (down)
    for k in (4096, 11008):
        assert [shrink_config(t, 16, k)["SPLIT_K"] for t in (1, 8, 16, 17, 32, 64)] == [16, 16, 16, 8, 8, 8]
    # a short K gets about two 128-wide K steps a program, whatever the cap
    assert shrink_config(32, 16, 1024)["SPLIT_K"] == 4
    assert shrink_config(1, 16, 128)["SPLIT_K"] == 1


def test_prefill_tiles_by_rank_and_splits_less():
    assert shrink_config(65, 16, 4096) == dict(BLOCK_N=16, BLOCK_K=128, SPLIT_K=4, num_warps=4, num_stages=3)
    assert shrink_config(512, 40, 4096)["BLOCK_N"] == 64
    assert shrink_config(513, 128, 4096)["SPLIT_K"] == 1
    assert shrink_config(4096, 8, 4096)["BLOCK_N"] == 16
