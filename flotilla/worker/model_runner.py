"""ModelRunner: SchedulerOutput -> input tensors -> model -> sampler -> ModelRunnerOutput.

It keeps a persistent per-request state (tokens, block table, seeded generator) that the scheduler's
diff-style outputs update, so each step only ships what changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flotilla.config import SpeculativeConfig
from flotilla.distributed.parallel_state import get_pp_group, get_tp_group
from flotilla.layers.attention import AttentionBackend, AttentionContext, CommonAttentionMetadata
from flotilla.layers.pipeline import IntermediateTensors
from flotilla.sampler import Sampler, SamplingMetadata
from flotilla.sampling_params import SamplingParams
from flotilla.scheduler.output import ModelRunnerOutput, PositionLogprobs, SchedulerOutput
from flotilla.spec_decode.rejection import expand_rows, verify
from flotilla.structured.decoding import StructuredDecoding
from flotilla.worker.prompt_logprobs import PromptLogprobsJob, compute_prompt_logprobs


@dataclass
class CachedRequestState:
    """A request as the worker knows it: all tokens so far (prompt + output), its block table, how many
    tokens already have KV, and its own generator when the request is seeded. ``prompt_logprobs`` collects
    the prompt's logprobs while its prefill runs (None when not wanted, or once they were sent)."""

    req_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    generator: torch.Generator | None
    prompt_logprobs: list[PositionLogprobs] | None = None


@dataclass
class StepInputs:
    """The flattened batch of one step (tokens of all requests back to back, decodes first)."""

    req_ids: list[str]
    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    common: CommonAttentionMetadata
    sample_req_ids: list[str]  # requests that reach their last known token this step
    sample_rows: torch.Tensor  # (R,) rows to sample from: per sampling request its last known token, then drafts
    sample_drafts: list[list[int]]  # per sampling request, the draft tokens verified this step (R = B + drafts)
    prompt_logprobs: PromptLogprobsJob  # rows whose next token is a prompt token of a request that wants them


class ModelRunner:
    """Runs one model on one device for the requests the scheduler hands it.

    Contract: ``execute_model`` must see every SchedulerOutput in order; it writes K/V for every scheduled
    token and samples one token for each request whose computation reaches its last known token. For a
    request with ``prompt_logprobs`` it computes them chunk by chunk as its prefill runs (chunked prefill
    included) and returns them all in the step that samples its first token; such a request must arrive
    without prefix-cache hits (the scheduler skips them), else ``RuntimeError``.
    Structured output: on the sampling rank (TP rank 0 of the last stage) ``structured`` holds a grammar
    matcher per constrained request; the next-token bitmasks are filled on its thread while the model's
    forward pass runs, applied in the sampler, and the sampled tokens accepted into the matchers.
    Speculative decoding (``speculative`` enabled): a request's draft tokens
    (``SchedulerOutput.scheduled_spec_decode_tokens``) are computed after its known tokens in the same forward
    pass; its last known token and every draft position are sampled rows, verified by
    ``flotilla.spec_decode.rejection.verify`` (every step goes through it, drafts or not, so a seeded request's
    stream does not depend on its neighbours); the accepted drafts and the sampled token go back, with the
    ``proposer``'s drafts for the next step (none for a request with structured output).
    With ``graphs`` set (``flotilla.worker.cuda_graphs``), a decode-only step it accepts runs from a captured
    CUDA graph; every other step runs the model eagerly.
    """

    def __init__(self, model: torch.nn.Module, backend: AttentionBackend, kv_caches: list[torch.Tensor],
                 block_size: int, device: torch.device, structured: StructuredDecoding | None = None,
                 speculative: SpeculativeConfig | None = None, proposer=None):
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler()
        self.requests: dict[str, CachedRequestState] = {}
        self.structured = structured
        self.speculative = speculative if speculative is not None and speculative.enabled else None
        self.proposer = proposer  # spec_decode proposer: propose(runner, req_ids, emitted) -> drafts per request
        self.graphs = None  # worker/cuda_graphs.DecodeGraphs: decode steps replayed from CUDA graphs (set on CUDA)
        # Generators outlive preemption (the request comes back as "new") so seeded output stays reproducible.
        self._generators: dict[str, torch.Generator] = {}

    # ---- state --------------------------------------------------------------------------------------
    def _update_states(self, so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids | so.preempted_req_ids:
            self.requests.pop(req_id, None)
            if req_id not in so.preempted_req_ids:
                self._generators.pop(req_id, None)
            if self.structured is not None:
                self.structured.remove(req_id)  # a preempted request's matcher is rebuilt when it resumes
        samples_here = self.is_sampling_rank()
        if self.proposer is not None:
            self.proposer.on_step(so)
        for new in so.scheduled_new_reqs:
            self.requests[new.req_id] = CachedRequestState(
                new.req_id, list(new.all_token_ids), len(new.prompt_token_ids), new.sampling_params,
                list(new.block_ids), new.num_computed_tokens, self._generator_for(new.req_id, new.sampling_params),
                self._prompt_logprobs_for(new))
            if samples_here and self.structured is not None and new.sampling_params.structured_outputs:
                self.structured.add(new.req_id, new.sampling_params,
                                    list(new.all_token_ids[len(new.prompt_token_ids):]))
        for cached in so.scheduled_cached_reqs:
            state = self.requests[cached.req_id]
            state.token_ids.extend(cached.new_token_ids)
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    @staticmethod
    def is_sampling_rank() -> bool:
        """Whether this rank samples (TP rank 0 of the last pipeline stage)."""
        return get_pp_group().is_last_rank and get_tp_group().rank_in_group == 0

    def _generator_for(self, req_id: str, params: SamplingParams) -> torch.Generator | None:
        if params.seed is None or params.greedy:
            return None
        gen = self._generators.get(req_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed % (2 ** 63))
            self._generators[req_id] = gen
        return gen

    @staticmethod
    def _prompt_logprobs_for(new) -> list[PositionLogprobs] | None:
        """An empty collector when ``new`` wants prompt logprobs and has no output yet (one that resumes
        after preemption with output already sent them)."""
        if new.sampling_params.prompt_logprobs is None or len(new.all_token_ids) > len(new.prompt_token_ids):
            return None
        if new.num_computed_tokens != 0:
            raise RuntimeError(f"request {new.req_id} wants prompt logprobs but arrived with "
                               f"{new.num_computed_tokens} tokens from the prefix cache")
        return []

    # ---- inputs -------------------------------------------------------------------------------------
    def _prepare_inputs(self, so: SchedulerOutput) -> StepInputs:
        counts = so.num_scheduled_tokens
        req_ids = sorted(counts, key=lambda r: counts[r] != 1)  # decodes first (stable)
        states = [self.requests[r] for r in req_ids]
        query_lens = np.array([counts[r] for r in req_ids], dtype=np.int64)  # (R,)
        context_lens = np.array([s.num_computed_tokens for s in states], dtype=np.int64)  # (R,)
        spec = so.scheduled_spec_decode_tokens
        tokens: list[int] = []
        for s, start, n in zip(states, context_lens.tolist(), query_lens.tolist()):
            tokens.extend(s.token_ids[start:start + n])  # the known tokens (all n unless drafts follow)
            tokens.extend(spec.get(s.req_id, ()))
        max_blocks = max(len(s.block_ids) for s in states)
        block_table = np.zeros((len(states), max_blocks), dtype=np.int64)  # (R, max_blocks)
        for i, s in enumerate(states):
            block_table[i, :len(s.block_ids)] = s.block_ids
        total = int(query_lens.sum())
        ends = np.cumsum(query_lens)  # (R,)
        req_of_token = np.repeat(np.arange(len(states)), query_lens)  # (T,)
        positions = context_lens[req_of_token] + np.arange(total) - (ends - query_lens)[req_of_token]  # (T,)
        slots = block_table[req_of_token, positions // self.block_size] * self.block_size \
            + positions % self.block_size  # (T,)
        samples = [i for i, s in enumerate(states) if context_lens[i] + query_lens[i] >= len(s.token_ids)]
        drafts = [list(spec.get(req_ids[i], ())) for i in samples]
        rows = [r for i, d in zip(samples, drafts) for r in range(int(ends[i]) - 1 - len(d), int(ends[i]))]
        num_decodes = int(np.count_nonzero(query_lens == 1))
        prompt_job = PromptLogprobsJob()
        for s, first_row, start, n in zip(states, (ends - query_lens).tolist(), context_lens.tolist(),
                                          query_lens.tolist()):
            if s.prompt_logprobs is not None:
                prompt_job.add(s.req_id, s.token_ids, s.num_prompt_tokens, first_row, start, n,
                               s.sampling_params.prompt_logprobs)
        seq_lens = context_lens + query_lens
        common = CommonAttentionMetadata(
            query_lens=torch.from_numpy(query_lens), context_lens=torch.from_numpy(context_lens),
            block_tables=torch.from_numpy(block_table).to(self.device),
            slot_mapping=torch.from_numpy(slots).to(self.device), num_decodes=num_decodes,
            block_size=self.block_size, max_query_len=int(query_lens.max()), max_seq_len=int(seq_lens.max()))
        return StepInputs(
            req_ids=req_ids, input_ids=torch.tensor(tokens, dtype=torch.long, device=self.device),
            positions=torch.from_numpy(positions).to(self.device), common=common,
            sample_req_ids=[req_ids[i] for i in samples],
            sample_rows=torch.tensor(rows, dtype=torch.long, device=self.device), sample_drafts=drafts,
            prompt_logprobs=prompt_job)

    # ---- step ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(so)
        if so.total_num_scheduled_tokens == 0:
            return ModelRunnerOutput()
        inputs = self._prepare_inputs(so)
        # The grammar bitmasks of this step's samples, filled while the model runs.
        masks = self.structured.start_fill(inputs.sample_req_ids) if self.structured is not None else None
        pp = get_pp_group()
        intermediate = None if pp.is_first_rank else IntermediateTensors.from_dict(pp.recv_tensors())
        if self.graphs is not None and intermediate is None and self.graphs.can_run(inputs):
            hidden = self.graphs.run(inputs)  # (T, hidden), replayed from a CUDA graph
        else:
            ctx = AttentionContext(self.backend, self.backend.build_metadata(inputs.common), self.kv_caches)
            hidden = self.model(inputs.input_ids, inputs.positions, ctx, intermediate)  # (T, hidden)
        for req_id in inputs.req_ids:
            self.requests[req_id].num_computed_tokens += so.num_scheduled_tokens[req_id]
        if not pp.is_last_rank:
            pp.send_tensors(hidden.to_dict())  # hidden is IntermediateTensors on non-last stages
            return ModelRunnerOutput()
        samples_here = get_tp_group().rank_in_group == 0  # TP rank 0 of the last stage samples for the group
        if inputs.prompt_logprobs:
            chunks = compute_prompt_logprobs(hidden, inputs.prompt_logprobs, self.model.compute_logits,
                                             keep=samples_here)
            for req_id, entries in chunks.items():
                self.requests[req_id].prompt_logprobs.extend(entries)
        if not inputs.sample_req_ids:
            return ModelRunnerOutput()
        logits = self.model.compute_logits(hidden[inputs.sample_rows])  # (R, vocab); every TP rank joins
        if not samples_here:
            return ModelRunnerOutput()
        masks = self.structured.collect(masks) if masks else None
        if self.speculative is not None:
            return self._verify(inputs.sample_req_ids, inputs.sample_drafts, logits, masks)
        return self._sample(inputs.sample_req_ids, logits, masks)

    def _sample(self, req_ids: list[str], logits: torch.Tensor,
                masks: tuple[list[int], torch.Tensor] | None = None) -> ModelRunnerOutput:
        states = [self.requests[r] for r in req_ids]
        md = SamplingMetadata.build(
            [s.sampling_params for s in states], [s.generator for s in states],
            [s.token_ids[:s.num_prompt_tokens] for s in states],
            [s.token_ids[s.num_prompt_tokens:] for s in states], self.device)
        if masks is not None:
            md.grammar_rows = torch.tensor(masks[0], dtype=torch.long, device=self.device)  # (C,)
            md.grammar_bitmask = masks[1]  # (C, W) int32
        result = self.sampler(logits, md, owned=True)  # compute_logits made them fresh
        sampled = result.sampled_token_ids.tolist()
        if masks is not None:
            for row in masks[0]:
                self.structured.accept(req_ids[row], sampled[row])
        out = ModelRunnerOutput(sampled_token_ids=dict(zip(req_ids, sampled)))
        if result.logprobs is not None:
            ids, lps, ranks = (t.tolist() for t in result.logprobs)
            for i, s in enumerate(states):
                n = s.sampling_params.logprobs
                if n is not None:
                    out.logprobs[s.req_id] = (ids[i][:1 + n], lps[i][:1 + n], ranks[i][:1 + n])
        self._send_prompt_logprobs(states, out)
        return out

    @staticmethod
    def _send_prompt_logprobs(states: list[CachedRequestState], out: ModelRunnerOutput) -> None:
        for s in states:
            if s.prompt_logprobs is not None:  # the prompt is complete: send them once
                out.prompt_logprobs[s.req_id], s.prompt_logprobs = s.prompt_logprobs, None

    def _verify(self, req_ids: list[str], drafts: list[list[int]], logits: torch.Tensor,
                masks: tuple[list[int], torch.Tensor] | None) -> ModelRunnerOutput:
        """Speculative decoding's sampling: logits (R, V) of every sampled row (request i: 1 + len(drafts[i])
        rows) -> accepted drafts, one sampled token each, and the next drafts."""
        states = [self.requests[r] for r in req_ids]
        params = [s.sampling_params for s in states]
        row_params, row_prompts, row_outputs = expand_rows(
            params, [s.token_ids[:s.num_prompt_tokens] for s in states],
            [s.token_ids[s.num_prompt_tokens:] for s in states], drafts)
        md = SamplingMetadata.build(row_params, [None] * len(row_params), row_prompts, row_outputs, self.device)
        first_row = np.cumsum([0] + [len(d) + 1 for d in drafts]).tolist()
        if masks is not None:  # constrained requests have no drafts: one row each
            md.grammar_rows = torch.tensor([first_row[i] for i in masks[0]], dtype=torch.long, device=self.device)
            md.grammar_bitmask = masks[1]
        draft_probs = [self.proposer.probs_for(s.req_id, d) if d and self.proposer is not None else None
                       for s, d in zip(states, drafts)]
        result = verify(logits.float(), md, params, drafts, draft_probs, [s.generator for s in states])
        if masks is not None:
            for i in masks[0]:
                self.structured.accept(req_ids[i], result.token_ids[i][0])
        out = ModelRunnerOutput()
        for s, emitted, lps in zip(states, result.token_ids, result.logprobs):
            out.sampled_token_ids[s.req_id] = emitted[-1]
            if len(emitted) > 1:
                out.accepted_draft_token_ids[s.req_id] = emitted[:-1]
            if lps is not None:
                out.logprobs[s.req_id] = lps[-1]
                if len(lps) > 1:
                    out.accepted_draft_logprobs[s.req_id] = lps[:-1]
        self._send_prompt_logprobs(states, out)
        if self.proposer is not None:
            out.draft_token_ids = self.proposer.propose(self, states, result.token_ids)
        return out
