"""The draft-model proposer (vLLM's ``"method": "draft_model"``): a smaller model with the target's vocabulary,
run by the same worker, proposes k tokens per request autoregressively.

The draft keeps its own paged KV cache (its own layers and heads) over the target's block tables: the same
block ids and block size, so the scheduler's allocation (with its k lookahead slots per request) covers the
draft's writes too, and freeing a request frees both. Per request the proposer tracks ``computed``: the
positions whose draft KV holds the request's real tokens. Each time the request samples, the draft catches up
in one forward over the tokens from ``computed`` to the newest one (the prompt on its first sample, then the
accepted drafts and the sampled token), then runs k - 1 single-token forwards over its own guesses. The KV
those forwards wrote is kept where the guesses were accepted (they were computed on the same tokens), so the
next catch-up starts after them: with every draft accepted it is 2 tokens (the last draft and the sampled
one), not k + 1; beyond the accepted guesses the KV is overwritten. A prefix-cache hit's blocks carry the draft KV
the first request wrote there (its draft catches up when it samples; a block reused before then holds stale
draft KV, which only lowers acceptance: verification never trusts a draft).

Greedy requests get the draft's argmax; random ones a sample of q = softmax(draft logits / temperature),
drawn with the request's generator when it is seeded, and q is kept for the verification of the next step
(``probs_for``).
"""

from __future__ import annotations

import numpy as np
import torch

from flotilla.config import EngineConfig, SpeculativeConfig
from flotilla.layers.attention import AttentionBackend, AttentionContext, CommonAttentionMetadata
from flotilla.models.loader import ResolvedModel, iterate_weights_filtered, load_hf_config
from flotilla.models.registry import get_model_class
from flotilla.layers.quant_weight import auto_dense_min_rows
from flotilla.models.weight_prep import can_keep_quantized, prepare_weights_


def draft_hf_config(spec: SpeculativeConfig):
    return load_hf_config(ResolvedModel(source=spec.draft_source, kind=spec.draft_source_kind))


def kv_bytes_per_block(hf_config, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one KV block of the draft model takes (all its layers)."""
    kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads)
    head_dim = int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads)
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * int(hf_config.num_hidden_layers) * block_size * kv_heads * head_dim * elem


def draft_weights(spec: SpeculativeConfig, config: EngineConfig, device: torch.device) -> tuple[bool, str | None, int]:
    """How the draft's weights are prepared: (keep a GGUF draft's blocks, "int8"/"int4" to quantize at load or
    None, float copies for steps of at least this many tokens, 0 for none).

    Without ``draft_quantization`` the draft follows the target: a GGUF draft keeps its blocks when the target
    does ("gguf"; a non-GGUF draft then runs float weights), int8/int4 quantize the draft at load too. With it,
    the draft's own choice; an int4 draft (drafts need not be exact: verification keeps the target's tokens)
    reads ~0.6 bytes per weight where a GGUF draft's Q5_0/Q8_0 blocks take ~0.7/~1.06, and like a kept GGUF draft
    it keeps float copies for long steps (its catch-up over a prompt) where the CPU's crossover says so."""
    mc = config.model
    q = spec.draft_quantization
    if q is None:
        q = mc.quantization or "none"
    keep = q == "gguf" and spec.draft_source_kind == "gguf" and can_keep_quantized(device, mc.dtype)
    quantization = q if q in ("int8", "int4") else None
    dense_min_rows = 0
    if keep or (quantization == "int4" and spec.draft_quantization is not None):
        dense_min_rows = mc.dense_min_rows if mc.quantization == "gguf" else auto_dense_min_rows()
    return keep, quantization, dense_min_rows


class DraftModelProposer:
    """Proposes drafts with a draft model; see the module docstring. ``on_step`` must see every
    SchedulerOutput (it forgets finished and preempted requests and starts new ones at their prefix hits)."""

    def __init__(self, model: torch.nn.Module, backend: AttentionBackend, kv_caches: list[torch.Tensor],
                 block_size: int, device: torch.device, k: int):
        self.model, self.backend, self.kv_caches = model, backend, kv_caches
        self.block_size, self.device, self.k = block_size, device, k
        self.computed: dict[str, int] = {}
        self._fed: dict[str, tuple[int, list[int]]] = {}  # req -> (position, guesses whose draft KV is written there)
        self._probs: dict[str, tuple[list[int], torch.Tensor]] = {}  # req -> (drafts, q (k, V)) of random requests

    @classmethod
    def load(cls, spec: SpeculativeConfig, config: EngineConfig, backend: AttentionBackend, num_blocks: int,
             device: torch.device, dtype: torch.dtype) -> "DraftModelProposer":
        hf_config = draft_hf_config(spec)
        with torch.device(device):
            model = get_model_class(getattr(hf_config, "architectures", None))(
                hf_config, dtype=dtype, max_model_len=config.model.max_model_len, pp_partition=None)
        resolved = ResolvedModel(source=spec.draft_source, kind=spec.draft_source_kind)
        keep, quantization, dense_min_rows = draft_weights(spec, config, device)
        model.load_weights(iterate_weights_filtered(resolved, hf_config, dtype, model.wants_weight,
                                                    keep_quantized=keep))
        prepare_weights_(model, keep_quantized=keep, quantization=quantization, dense_min_rows=dense_min_rows,
                         batch_invariant=False, prepack=not config.model.batch_invariant, what="draft model")
        kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads)
        head_dim = int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads)
        shape = backend.kv_cache_shape(num_blocks, config.cache.block_size, kv_heads, head_dim)
        caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(int(hf_config.num_hidden_layers))]
        return cls(model.eval(), backend, caches, config.cache.block_size, device, spec.num_speculative_tokens)

    # ---- state ----------------------------------------------------------------------------------------
    def on_step(self, so) -> None:
        for req_id in so.finished_req_ids | so.preempted_req_ids:
            self.computed.pop(req_id, None)
            self._probs.pop(req_id, None)
            self._fed.pop(req_id, None)
        for new in so.scheduled_new_reqs:
            self.computed[new.req_id] = new.num_computed_tokens
            self._probs.pop(new.req_id, None)
            self._fed.pop(new.req_id, None)

    def _skip_accepted_guesses(self, req_id: str, seq: list[int]) -> None:
        """Move ``computed`` past the guesses of the last proposal that ``seq`` accepted (their draft KV is
        written), leaving at least the newest token to compute."""
        start = self.computed[req_id]
        fed = self._fed.pop(req_id, None)
        if fed is None or fed[0] != start:
            return
        n = 0
        for token, guess in zip(seq[start:len(seq) - 1], fed[1]):
            if token != guess:
                break
            n += 1
        self.computed[req_id] = start + n

    def probs_for(self, req_id: str, drafts: list[int]) -> torch.Tensor | None:
        """q (len(drafts), V) of the drafts proposed for a random request (the scheduler may have kept a
        prefix of them); None for greedy requests and drafts it did not propose."""
        kept = self._probs.pop(req_id, None)
        if kept is None or kept[0][:len(drafts)] != list(drafts):
            return None
        return kept[1][:len(drafts)]

    # ---- proposing ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, runner, states, emitted: list[list[int]]) -> dict[str, list[int]]:
        """Drafts for each sampling request (``states[i]`` after ``emitted[i]``); none for structured output
        or where the request's blocks leave no slot for them."""
        jobs = []  # (state, sequence, number of drafts)
        for s, tokens in zip(states, emitted):
            seq = s.token_ids + tokens
            room = len(s.block_ids) * self.block_size - len(seq) + 1  # slots for positions len(seq)-1 .. +k-2
            k = min(self.k, room)
            if s.sampling_params.structured_outputs is None and k > 0 and s.req_id in self.computed:
                jobs.append((s, seq, k))
        if not jobs:
            return {}
        # Catch up: one forward over each request's tokens from ``computed`` (decodes first).
        for s, seq, _ in jobs:
            self._skip_accepted_guesses(s.req_id, seq)
        jobs.sort(key=lambda j: len(j[1]) - self.computed[j[0].req_id] != 1)
        chunks = [(s.block_ids, self.computed[s.req_id], seq[self.computed[s.req_id]:]) for s, seq, _ in jobs]
        logits = self._forward(chunks)  # (B, V)
        for s, seq, _ in jobs:
            self.computed[s.req_id] = len(seq)
        drafts: list[list[int]] = [[] for _ in jobs]
        probs: list[list[torch.Tensor]] = [[] for _ in jobs]
        active = list(range(len(jobs)))
        for step in range(self.k):
            picked = self._pick(logits, [jobs[i][0] for i in active])  # (tokens, q rows or None)
            for row, i in enumerate(active):
                drafts[i].append(picked[0][row])
                if picked[1] is not None and picked[1][row] is not None:
                    probs[i].append(picked[1][row])
            active = [i for i in active if len(drafts[i]) < jobs[i][2]]
            if not active or step == self.k - 1:
                break
            logits = self._forward([(jobs[i][0].block_ids, len(jobs[i][1]) + step, [drafts[i][-1]])
                                    for i in active])  # (A, V)
        out = {}
        for (s, seq, _), d, q in zip(jobs, drafts, probs):
            out[s.req_id] = d
            self._fed[s.req_id] = (len(seq), d[:-1])  # every guess but the last went through a forward
            if q:
                self._probs[s.req_id] = (d, torch.stack(q))
        return out

    def _pick(self, logits: torch.Tensor, states) -> tuple[list[int], list[torch.Tensor | None] | None]:
        """One draft token per row (argmax for greedy requests, a sample of softmax(logits / T) otherwise)."""
        tokens = logits.argmax(dim=-1).tolist()
        if all(s.sampling_params.greedy for s in states):
            return tokens, None
        qs: list[torch.Tensor | None] = []
        for row, s in enumerate(states):
            if s.sampling_params.greedy:
                qs.append(None)
                continue
            q = torch.softmax(logits[row].float() / s.sampling_params.temperature, dim=-1)  # (V,)
            tokens[row] = int(torch.multinomial(q, 1, generator=s.generator))
            qs.append(q)
        return tokens, qs

    def _forward(self, chunks: list[tuple[list[int], int, list[int]]]) -> torch.Tensor:
        """Run the draft over (block table, first position, tokens) per request, requests with one token
        first; returns the logits (B, V) at each request's last token."""
        query_lens = np.array([len(t) for _, _, t in chunks], dtype=np.int64)  # (B,)
        context_lens = np.array([start for _, start, _ in chunks], dtype=np.int64)  # (B,)
        max_blocks = max(len(b) for b, _, _ in chunks)
        table = np.zeros((len(chunks), max_blocks), dtype=np.int64)  # (B, max_blocks)
        for i, (blocks, _, _) in enumerate(chunks):
            table[i, :len(blocks)] = blocks
        ends = np.cumsum(query_lens)  # (B,)
        req_of_token = np.repeat(np.arange(len(chunks)), query_lens)  # (T,)
        positions = context_lens[req_of_token] + np.arange(int(ends[-1])) - (ends - query_lens)[req_of_token]
        slots = table[req_of_token, positions // self.block_size] * self.block_size + positions % self.block_size
        common = CommonAttentionMetadata(
            query_lens=torch.from_numpy(query_lens), context_lens=torch.from_numpy(context_lens),
            block_tables=torch.from_numpy(table).to(self.device), slot_mapping=torch.from_numpy(slots).to(self.device),
            num_decodes=int(np.count_nonzero(query_lens == 1)), block_size=self.block_size,
            max_query_len=int(query_lens.max()), max_seq_len=int((context_lens + query_lens).max()))
        ctx = AttentionContext(self.backend, self.backend.build_metadata(common), self.kv_caches)
        tokens = torch.tensor([t for _, _, ts in chunks for t in ts], dtype=torch.long, device=self.device)
        hidden = self.model(tokens, torch.from_numpy(positions).to(self.device), ctx, None)  # (T, hidden)
        return self.model.compute_logits(hidden[torch.from_numpy(ends - 1).to(self.device)])  # (B, V)
