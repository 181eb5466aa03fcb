"""Decodes split into length groups (torch_paged backend) give the same tokens as decoding one at a time."""

from __future__ import annotations

import random

from flotilla import LLM, SamplingParams
from flotilla.layers.attention.torch_paged import DECODE_GROUP_MIN, DECODE_GROUPS_MAX


def test_length_grouped_decodes_match_unbatched(tiny_llama):
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
