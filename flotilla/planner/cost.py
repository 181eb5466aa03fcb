"""The cost model: seconds per engine step of a parallel plan, memory per rank, KV capacity.

One step computes ``StepWork`` (tokens of several sequences: prefill chunks and decodes). On every rank of
pipeline stage ``s`` (``L_s`` layers, tensor-parallel size ``t``, ``M`` tokens, ``S`` sampled sequences)::

    linear  = max(2 M P_lin / F(M), (W_lin + A) / BW)          P_lin: the layer matmuls' weights per rank
    attn    = max(4 (heads/t) head_dim pairs / F(M/seqs), KV_read / BW)   pairs: query x key positions
    head    = max(2 S V/t h / F(S), V/t h / BW)                  last stage: the LM head on sampled rows only
    comm    = L_s * 2 all_reduce(M h) [+ embedding all-reduce, logits all-gather]   (t > 1)
              (+ the measured wait for a descheduled rank per collective when a shared node is oversubscribed)
    stage   = kernel_scale (linear + attn + head) / host + comm_scale comm + per_layer L_s
              (+ step + per_seq seqs on stage 0, which hosts the driver)

and a pipeline hop sends hidden + residual (``2 M h`` elements). ``host`` (shared CPU nodes) is the share of
their cores the ranks keep next to the serving processes: ``min(1, (cores - host_cores) / (ranks x threads))``
over the ``min(1, cores / (ranks x threads))`` the rates already assume (1 when a core is left over).
``F(M)`` and ``BW`` are the rates one rank gets (``Hardware.matmul_rate`` / ``bandwidth``: a shared CPU node
splits its cores among all ranks of all replicas); all-reduce and send use the hardware's alpha-beta.
``Calibration`` holds the runtime overheads, the two scales and ``host_cores``;
``flotilla.planner.calibration`` refits them from measured runs.

The pipeline's micro-batches are timed by the simulator stage by stage (a stage is busy while it computes),
so bubbles follow from the schedule; ``pipeline_time`` is the closed form for m equal micro-batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from flotilla.planner.hardware import Hardware
from flotilla.planner.model import DTYPE_BYTES, ModelDesc

GiB = 1 << 30
LOGITS_BYTES = 4  # float32 logits per vocabulary entry (sampler input)


@dataclass(frozen=True)
class Plan:
    """One candidate deployment: ``replicas`` engines of ``tp`` x ``pp`` ranks, each scheduling at most
    ``max_num_seqs`` sequences and ``max_num_batched_tokens`` tokens per step, running in ``dtype``
    (``quantization`` "int8": weight-only int8 matmuls) with ``kv_cache_bytes`` of KV cache per rank.
    ``num_threads`` (CPU): torch threads per rank."""

    tp: int
    pp: int
    replicas: int
    max_num_seqs: int
    dtype: str
    max_model_len: int
    max_num_batched_tokens: int = 2048
    quantization: str | None = None
    kv_cache_bytes: int = 0
    block_size: int = 16
    num_threads: int | None = None

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def num_devices(self) -> int:
        return self.world_size * self.replicas

    @property
    def label(self) -> str:
        threads = f" thr={self.num_threads}" if self.num_threads else ""
        return f"TP{self.tp} PP{self.pp} x{self.replicas} seqs={self.max_num_seqs}{threads}"


@dataclass(frozen=True)
class StepWork:
    """What one engine step (or one micro-batch) computes: ``num_tokens`` tokens of ``num_seqs`` sequences,
    ``num_sampled`` of which reach their last known token (the LM head runs on those rows only);
    ``attn_pairs``: (query, key) position pairs of causal attention; ``kv_read_tokens``: KV positions read
    (each sequence's context plus its new tokens)."""

    num_tokens: int
    num_seqs: int
    num_sampled: int
    attn_pairs: float
    kv_read_tokens: int

    @classmethod
    def of(cls, chunks) -> StepWork:
        """From ``(new_tokens, context_before, sampled)`` per sequence."""
        tokens = seqs = sampled = kv = 0
        pairs = 0.0
        for n, ctx, smp in chunks:
            tokens += n
            seqs += 1
            sampled += bool(smp)
            pairs += n * ctx + n * (n + 1) / 2
            kv += ctx + n
        return cls(tokens, seqs, sampled, pairs, kv)

    @classmethod
    def decode(cls, batch: int, context: int) -> StepWork:
        """``batch`` sequences decoding one token each after ``context`` tokens."""
        return cls.of([(1, context, True)] * batch)

    @classmethod
    def prefill(cls, tokens: int, context: int = 0) -> StepWork:
        """One prompt chunk of ``tokens`` after ``context`` cached tokens, completing the prompt."""
        return cls.of([(tokens, context, True)])


@dataclass(frozen=True)
class Calibration:
    """Runtime overheads (seconds; see ``hardware.Overheads``) and scales on the roofline kernel time and
    the communication time. ``fitted_from``: how many measured runs the values were fitted on (0: priors)."""

    step: float
    per_seq: float
    per_layer: float
    kernel_scale: float = 1.0
    comm_scale: float = 1.0
    fitted_from: int = 0
    host_cores: float = 0.0

    @classmethod
    def prior(cls, hardware: Hardware) -> Calibration:
        o = hardware.overheads
        return cls(step=o.step, per_seq=o.per_seq, per_layer=o.per_layer, host_cores=o.host_cores)

    def with_values(self, **values) -> Calibration:
        return replace(self, **values)


@dataclass(frozen=True)
class StageCost:
    """One stage's step time split into its parts (seconds)."""

    linear: float
    attention: float
    lm_head: float
    comm: float
    overhead: float

    @property
    def total(self) -> float:
        return self.linear + self.attention + self.lm_head + self.comm + self.overhead


class CostModel:
    """Step times and memory of ``plan`` for ``model`` on ``hardware`` (see the module docstring)."""

    def __init__(self, model: ModelDesc, hardware: Hardware, plan: Plan, calibration: Calibration | None = None):
        self.model, self.hw, self.plan = model, hardware, plan
        self.calib = calibration or Calibration.prior(hardware)
        self.elem = DTYPE_BYTES[plan.dtype]
        self.layers = model.stage_layers(plan.pp)
        self.ranks_on_node = math.ceil(plan.num_devices / hardware.nodes) if hardware.shared else 1
        self.sync = hardware.sync_penalty(self.ranks_on_node)
        self.threads = plan.num_threads or hardware.threads_per_rank(self.ranks_on_node)
        self.host = self._host_share()
        self.bw = hardware.bandwidth(self.ranks_on_node, self.threads)
        int8_curve = plan.quantization == "int8" and "int8" in (hardware.matmul_curves or {})
        self.linear_dtype = "int8" if int8_curve else plan.dtype
        tp = plan.tp
        self.lin_params = model.layer_linear_params(tp)
        self.lin_bytes = self.lin_params * (1 if plan.quantization == "int8" else self.elem)
        kv_rank = model.kv_heads_per_rank(tp) * model.head_dim
        h, inter = model.hidden_size, model.intermediate_size // tp
        self.act_elems_per_token = 8 * h + 2 * (model.q_size // tp + 2 * kv_rank) + 6 * inter
        self.head_params = model.lm_head_params(tp)
        self.head_bytes = self.head_params * (1 if plan.quantization == "int8" else self.elem)
        # Stages in different nodes: the hop between them crosses the inter-node link.
        per_node = hardware.devices_per_node
        self.hop_inter_node = [((s + 1) * tp - 1) // per_node != ((s + 1) * tp) // per_node
                               for s in range(plan.pp - 1)] if not hardware.shared else [False] * (plan.pp - 1)

    def _host_share(self) -> float:
        """The share of the ranks' compute left next to the serving processes (see the module docstring)."""
        if not self.hw.shared or self.calib.host_cores <= 0:
            return 1.0
        cores, wanted = self.hw.devices_per_node, self.ranks_on_node * self.threads
        return min(1.0, max(cores - self.calib.host_cores, 0.1) / wanted) / min(1.0, cores / wanted)

    # ------------------------------------------------------------------ time
    def stage_cost(self, work: StepWork, stage: int) -> StageCost:
        """The time one rank of ``stage`` spends on ``work``."""
        m, hw, model, plan = work.num_tokens, self.hw, self.model, self.plan
        layers = self.layers[stage]
        overhead = self.calib.per_layer * layers
        if stage == 0:
            overhead += self.calib.step + self.calib.per_seq * work.num_seqs
        if m == 0:
            return StageCost(0.0, 0.0, 0.0, 0.0, overhead)
        k, scale = self.ranks_on_node, self.calib.kernel_scale / self.host
        rate = hw.matmul_rate(self.linear_dtype, m, k, self.threads)
        lin_flops = 2.0 * m * self.lin_params * layers
        lin_bytes = layers * (self.lin_bytes + m * self.act_elems_per_token * self.elem)
        linear = max(lin_flops / rate, lin_bytes / self.bw)
        heads = model.num_heads // plan.tp
        attn_flops = 4.0 * heads * model.head_dim * work.attn_pairs * layers
        kv_bytes = model.kv_bytes_per_token(plan.tp, layers, self.elem) * (work.kv_read_tokens + m)
        attn_rate = hw.matmul_rate(plan.dtype, max(1, m // max(1, work.num_seqs)), k, self.threads)
        attention = max(attn_flops / attn_rate, kv_bytes / self.bw)
        syncs = (2 * layers + (stage == 0)) if plan.tp > 1 else 0
        comm = layers * 2 * hw.all_reduce_time(m * model.hidden_size * self.elem, plan.tp)
        if stage == 0:
            comm += hw.all_reduce_time(m * model.hidden_size * self.elem, plan.tp)  # vocab-parallel embedding
        head = 0.0
        if stage == plan.pp - 1 and work.num_sampled:
            s = work.num_sampled
            head_flops = 2.0 * s * self.head_params
            head_io = self.head_bytes + s * model.padded_vocab(plan.tp) // plan.tp * LOGITS_BYTES
            head = max(head_flops / hw.matmul_rate(self.linear_dtype, s, k, self.threads), head_io / self.bw)
            head += s * model.vocab_size * LOGITS_BYTES / self.bw  # the sampler reads every logit once
            comm += hw.all_gather_time(s * model.padded_vocab(plan.tp) * self.elem, plan.tp)
            syncs += plan.tp > 1
        comm += syncs * self.sync
        return StageCost(scale * linear, scale * attention, scale * head, self.calib.comm_scale * comm, overhead)

    def stage_times(self, work: StepWork) -> list[float]:
        return [self.stage_cost(work, s).total for s in range(self.plan.pp)]

    def hop_time(self, work: StepWork, hop: int = 0) -> float:
        """Seconds to hand ``work``'s activations (hidden + residual) from stage ``hop`` to ``hop + 1``."""
        nbytes = 2 * work.num_tokens * self.model.hidden_size * self.elem
        return self.calib.comm_scale * (self.hw.send_time(nbytes, self.hop_inter_node[hop]) + self.sync)

    def step_time(self, work: StepWork) -> float:
        """Seconds of one step alone (no other micro-batch in flight): every stage and hop in turn."""
        return sum(self.stage_times(work)) + sum(self.hop_time(work, h) for h in range(self.plan.pp - 1))

    def pipeline_time(self, work: StepWork, num_microbatches: int) -> float:
        """Closed form for ``num_microbatches`` equal micro-batches of ``work`` pushed back to back: the first
        crosses every stage and hop, each later one leaves one slowest-stage time after the previous
        (the (pp - 1) stage times of fill and drain are the bubble)."""
        slowest = max(max(self.stage_times(work)), max((self.hop_time(work, h) for h in range(self.plan.pp - 1)),
                                                       default=0.0))
        return self.step_time(work) + (num_microbatches - 1) * slowest

    # ------------------------------------------------------------------ memory
    def weight_bytes(self, stage: int) -> int:
        return self.model.weight_bytes(self.plan.tp, self.plan.pp, stage, self.plan.dtype, self.plan.quantization)

    def activation_bytes(self, stage: int) -> int:
        """Peak working memory of a step: activations of ``max_num_batched_tokens`` tokens, and on the last
        stage the logits and sampler buffers of ``max_num_seqs`` rows."""
        plan = self.plan
        act = plan.max_num_batched_tokens * self.act_elems_per_token * self.elem
        if stage == plan.pp - 1:
            act += 2 * plan.max_num_seqs * self.model.padded_vocab(plan.tp) * LOGITS_BYTES
        return act

    def kv_bytes_per_block(self, stage: int) -> int:
        return self.plan.block_size * self.model.kv_bytes_per_token(self.plan.tp, self.layers[stage], self.elem)

    def num_kv_blocks(self, kv_cache_bytes: int | None = None) -> int:
        """Blocks the engine makes of ``kv_cache_bytes`` per rank (the stage with the most layers decides)."""
        budget = self.plan.kv_cache_bytes if kv_cache_bytes is None else kv_cache_bytes
        return min(budget // self.kv_bytes_per_block(s) for s in range(self.plan.pp))

    def memory_per_rank(self, stage: int) -> int:
        """Bytes one rank of ``stage`` holds: weights, KV cache, activations and the runtime's reserve."""
        return int(self.weight_bytes(stage) + self.plan.kv_cache_bytes + self.activation_bytes(stage)
                   + self.hw.reserved)
