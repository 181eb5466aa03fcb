"""Decodes split into length groups (torch_paged backend) give the same tokens as decoding one at a time.

Runs on both kernel paths (tests/conftest.py): with the fused kernels the decodes go to the paged decode
kernel, without them to the length-grouped batched matmuls; each run checks that its path really ran.
"""

from __future__ import annotations

import random

import pytest

from flotilla import LLM, SamplingParams
from flotilla.layers.attention.torch_paged import DECODE_GROUP_MIN, DECODE_GROUPS_MAX, TorchPagedAttentionBackend

pytestmark = pytest.mark.both_kernel_paths


@pytest.fixture
def decode_paths(monkeypatch):
    """Counts the steps whose decodes went to the fused kernel and the group sizes of the grouped path."""
    seen = {"fused": 0, "groups": []}
    build_metadata = TorchPagedAttentionBackend.build_metadata
    build_groups = TorchPagedAttentionBackend._build_decode_groups

    def counting_build_metadata(self, common):
        md = build_metadata(self, common)
        seen["fused"] += md.decode_seq_lens is not None
        return md

    def counting_build_groups(seq_lens, block_tables, bs, device):
        groups = build_groups(seq_lens, block_tables, bs, device)
        seen["groups"].append(len(groups))
        return groups

    monkeypatch.setattr(TorchPagedAttentionBackend, "build_metadata", counting_build_metadata)
    monkeypatch.setattr(TorchPagedAttentionBackend, "_build_decode_groups", staticmethod(counting_build_groups))
    return seen


def test_length_grouped_decodes_match_unbatched(tiny_llama, cpu_kernels, decode_paths):
    path, _ = tiny_llama
    rng = random.Random(3)
    n = DECODE_GROUP_MIN * DECODE_GROUPS_MAX + 5  # enough decodes for every group, of uneven sizes
    prompts = [{"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(rng.randrange(3, 90))]}
               for _ in range(n)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = LLM(model=path, dtype="float32", max_model_len=128, num_kv_blocks=1024, max_num_seqs=n)
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts[:12]]
    assert batched[:12] == alone
    if cpu_kernels == "eager":
        assert decode_paths["fused"] == 0
        assert DECODE_GROUPS_MAX in decode_paths["groups"]  # the full batch's decodes ran in every group
    else:
        assert decode_paths["fused"] > 0 and decode_paths["groups"] == []
