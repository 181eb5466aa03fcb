"""Pure helpers for partitioning work across ranks (no torch.distributed)."""

from __future__ import annotations


def pp_partition(num_layers: int, pp_size: int, partition: list[int] | None = None) -> list[int]:
    """Number of decoder layers on each pipeline stage.

    Default: an even split where the *earlier* stages take the remainder (10 layers on 4 stages ->
    [3, 3, 2, 2]): the last stage also runs the final norm, the LM head over the whole vocabulary and
    sampling, so it gets the fewer layers. An explicit ``partition`` (one positive count per stage,
    summing to ``num_layers``) overrides it. Raises ValueError when the split is impossible or the
    explicit list is inconsistent.
    """
    if num_layers < 1:
        raise ValueError(f"the model must have at least one layer, got {num_layers}")
    if pp_size < 1:
        raise ValueError(f"pipeline parallel size must be >= 1, got {pp_size}")
    if partition is not None:
        partition = list(partition)
        if len(partition) != pp_size:
            raise ValueError(f"pipeline partition {partition} has {len(partition)} stages, "
                             f"pipeline parallel size is {pp_size}")
        if any(not isinstance(n, int) or n < 1 for n in partition):
            raise ValueError(f"pipeline partition {partition}: every stage needs a positive layer count")
        if sum(partition) != num_layers:
            raise ValueError(f"pipeline partition {partition} sums to {sum(partition)} layers, "
                             f"the model has {num_layers}")
        return partition
    if pp_size > num_layers:
        raise ValueError(f"cannot split {num_layers} layers over {pp_size} pipeline stages "
                         f"(each stage needs at least one layer)")
    base, extra = divmod(num_layers, pp_size)
    return [base + (1 if stage < extra else 0) for stage in range(pp_size)]


def get_pp_layer_range(num_layers: int, pp_rank: int, pp_size: int,
                       partition: list[int] | None = None) -> tuple[int, int]:
    """The half-open range ``[start, end)`` of decoder layers pipeline stage ``pp_rank`` owns.

    Split as in ``pp_partition`` (even by default with earlier stages taking the remainder, or the explicit
    per-stage counts). Raises ValueError for an out-of-range ``pp_rank`` or an impossible split.
    """
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pipeline rank {pp_rank} is outside pipeline parallel size {pp_size}")
    counts = pp_partition(num_layers, pp_size, partition)
    start = sum(counts[:pp_rank])
    return start, start + counts[pp_rank]


def describe_parallel_plan(num_layers: int, tp_size: int, pp_size: int,
                           partition: list[int] | None = None) -> list[str]:
    """One line per pipeline stage for the startup log: its global ranks (rank = pp_rank * tp_size +
    tp_rank), its layers and the extra modules it holds, e.g.
    "stage 0: ranks 0-1, layers 0-14 (15), embedding"."""
    lines = []
    for stage in range(pp_size):
        start, end = get_pp_layer_range(num_layers, stage, pp_size, partition)
        ranks = f"rank {stage * tp_size}" if tp_size == 1 else \
            f"ranks {stage * tp_size}-{(stage + 1) * tp_size - 1}"
        extras = (["embedding"] if stage == 0 else []) + (["norm", "lm_head"] if stage == pp_size - 1 else [])
        lines.append(f"stage {stage}: {ranks}, layers {start}-{end - 1} ({end - start}), {', '.join(extras)}"
                     if extras else f"stage {stage}: {ranks}, layers {start}-{end - 1} ({end - start})")
    return lines
