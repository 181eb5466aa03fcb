"""Model and engine arguments, resolved one way for the CLI, the deployment file and Ray Serve.

- ``add_engine_args`` / ``engine_args_from``: the engine flags (vLLM's names) that ``flotilla serve``,
  ``flotilla generate`` and ``flotilla bench`` share, and the ``EngineArgs`` they stand for.
- ``resolve_model_arg``: ``flotilla serve``'s positional MODEL merged into ``--model``.
- ``flags_conflicting_with_config``: model, engine and repository flags given next to ``--config`` (they
  belong in the file).
- ``deployment_from_cli``: the one-model ``DeploymentConfig`` that ``flotilla serve MODEL --flags`` stands
  for (the shorthand of the deployment file), with the ``--model-repository`` flags' repository.
- ``ENGINE_KEYS_SET_ELSEWHERE``: the ``EngineArgs`` fields a deployment file's model entry sets with its own
  keys (so they are not ``engine:`` overrides).
- ``structured_outputs_config``: vLLM's ``--structured-outputs-config`` JSON with its
  ``--structured-outputs-config.backend`` shorthand and the older ``--guided-decoding-backend`` merged in.
- ``finite_float`` / ``rate_float``: the argparse types of every float flag (NaN and infinity are usage
  errors naming the flag, exit code 2, before anything loads; ``rate_float`` allows ``inf``, as vLLM's
  ``--request-rate`` does).

This module imports nothing heavy (``EngineArgs`` and the model aliases load only when called), so building
the CLI parser stays fast.
"""

from __future__ import annotations

import argparse
import json
import math

from flotilla.config import SCHEDULING_POLICIES, STRUCTURED_OUTPUTS_BACKENDS
from flotilla.deploy.spec import DeploymentConfig, ModelSpec

# EngineArgs field -> the model entry's key that sets it in a deployment file.
ENGINE_KEYS_SET_ELSEWHERE = {"model": "model", "served_model_name": "name",
                             "tensor_parallel_size": "parallel.tensor",
                             "pipeline_parallel_size": "parallel.pipeline"}


def finite_float(text: str) -> float:
    """argparse type of a float flag: a finite number (argparse names the flag in the error)."""
    value = _float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def rate_float(text: str) -> float:
    """argparse type of a rate whose ``inf`` means "no limit": a finite number or +inf."""
    value = _float(text)
    if not (math.isfinite(value) or value == math.inf):
        raise argparse.ArgumentTypeError(f"expected a finite number or inf, got {text!r}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local HF directory, .gguf file or alias "
                                                 "(default: smollm2-135m-instruct)")
    p.add_argument("--runner", default="auto", choices=["auto", "generate", "pooling"],
                   help="generate (decoders) or pooling (embedding models); auto detects it from the architecture")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--quantization", "-q", choices=["gguf", "int8", "int4", "none"], default=None,
                   help="weight-only quantization: gguf keeps a GGUF file's quantized weights (the default for "
                        "GGUF models on the CPU; large steps use float copies, see --gguf-dense-min-tokens), int8 "
                        "(per-row) or int4 (group-wise, 32) quantize at load, none runs float weights (a GGUF "
                        "file dequantized to --dtype)")
    p.add_argument("--gguf-dense-min-tokens", type=int, default=None, metavar="N",
                   help="with gguf: steps of at least N tokens multiply bfloat16 copies of the weights (kept beside "
                        "the quantized blocks; the int8 kernels win only at a few tokens per step); 0 keeps no copy "
                        "(least memory); default: this CPU's crossover (8)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-memory", type=finite_float, default=1.0, help="KV cache budget in GiB")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache size in blocks (overrides GiB)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--scheduling-policy", choices=SCHEDULING_POLICIES, default="fcfs",
                   help="fcfs: first come first served (requests with a positive priority, such as batch work, wait "
                        "behind priority-0 ones); priority: serve by the request's priority (lower first), preempting "
                        "worse running requests (vLLM's)")
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument("--no-enable-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
    p.add_argument("--batch-invariant", action="store_true",
                   help="each request's tokens and logprobs independent of the batch it runs in "
                        "(not with --quantization)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: run decode steps eagerly instead of replaying captured CUDA graphs (vLLM's)")
    off = p.add_argument_group("weight offload")
    off.add_argument("--cpu-offload-gb", type=finite_float, default=0.0, metavar="GIB",
                     help="GiB of the weights (whole decoder layers) kept in pinned CPU memory and streamed to the "
                          "device layer by layer ahead of use (vLLM's)")
    off.add_argument("--max-resident-weights", type=finite_float, default=None, metavar="GIB",
                     help="CPU: at most this many GiB of weights materialised at once; the decoder layers that do "
                          "not fit stay memory-mapped in the model file and are read ahead of use")
    par = p.add_argument_group("parallelism")
    par.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    par.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    par.add_argument("--pipeline-partition", default=None,
                     help="layers per pipeline stage, comma separated (default: an even split)")
    par.add_argument("--distributed-executor-backend", "--executor", dest="distributed_executor_backend",
                     choices=["uni", "mp", "ray", "external"], default=None,
                     help="how ranks run (default: uni for one rank, mp for several; external under "
                          "torchrun/mpirun/srun is detected)")
    par.add_argument("--distributed-backend", choices=["gloo", "nccl"], default=None,
                     help="torch.distributed backend (default: nccl on CUDA, gloo on CPU)")
    par.add_argument("--ray-address", default=None, help="Ray cluster address for --executor ray")
    par.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--speculative-config", type=json_object, default=None, metavar="JSON",
                   help='speculative decoding (vLLM\'s): \'{"method": "ngram", "num_speculative_tokens": 4, '
                        '"prompt_lookup_max": 4, "prompt_lookup_min": 2}\' (prompt lookup) or \'{"method": '
                        '"draft_model", "model": "qwen2.5-coder-0.5b-instruct", "num_speculative_tokens": 4}\' '
                        '(a draft\'s "quantization": gguf, int8, int4 or none; default: as the target)')
    so = p.add_argument_group("structured outputs")
    so.add_argument("--structured-outputs-config", type=json_object, default=None, metavar="JSON",
                    help='vLLM\'s structured-outputs config, e.g. \'{"backend": "auto"}\': backend auto (xgrammar, '
                         "and llguidance for a schema, regex or grammar xgrammar rejects), xgrammar or guidance")
    so.add_argument("--structured-outputs-config.backend", dest="structured_outputs_config_backend",
                    choices=STRUCTURED_OUTPUTS_BACKENDS, default=None, help="the backend alone (vLLM's shorthand)")
    so.add_argument("--guided-decoding-backend", choices=STRUCTURED_OUTPUTS_BACKENDS, default=None,
                    help="vLLM's older name of --structured-outputs-config.backend")


def json_object(text: str) -> dict:
    """argparse type of a JSON-object flag (argparse names the flag in the error)."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def structured_outputs_config(ns: argparse.Namespace) -> dict | None:
    """``--structured-outputs-config`` with ``--structured-outputs-config.backend`` or
    ``--guided-decoding-backend`` merged in; ValueError when they name different backends."""
    config = dict(getattr(ns, "structured_outputs_config", None) or {})
    for dest, flag in (("structured_outputs_config_backend", "--structured-outputs-config.backend"),
                       ("guided_decoding_backend", "--guided-decoding-backend")):
        value = getattr(ns, dest, None)
        if value is None:
            continue
        if config.get("backend", value) != value:
            raise ValueError(f"{flag} {value} contradicts the structured-outputs backend {config['backend']!r} "
                             "given by another flag")
        config["backend"] = value
    return config or None


def engine_args_from(ns: argparse.Namespace):
    from flotilla.engine.arg_utils import EngineArgs
    partition = [int(x) for x in ns.pipeline_partition.split(",")] if ns.pipeline_partition else None
    return EngineArgs(model=ns.model, dtype=ns.dtype, quantization=ns.quantization,
                      gguf_dense_min_tokens=ns.gguf_dense_min_tokens, max_model_len=ns.max_model_len,
                      kv_cache_memory=ns.kv_cache_memory, num_kv_blocks=ns.num_kv_blocks, block_size=ns.block_size,
                      max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens,
                      scheduling_policy=ns.scheduling_policy,
                      enable_prefix_caching=ns.enable_prefix_caching,
                      enable_chunked_prefill=ns.enable_chunked_prefill,
                      tensor_parallel_size=ns.tensor_parallel_size, pipeline_parallel_size=ns.pipeline_parallel_size,
                      pipeline_partition=partition, distributed_executor_backend=ns.distributed_executor_backend,
                      distributed_backend=ns.distributed_backend, ray_address=ns.ray_address, device=ns.device,
                      batch_invariant=ns.batch_invariant, enforce_eager=ns.enforce_eager, runner=ns.runner,
                      structured_outputs_config=structured_outputs_config(ns),
                      speculative_config=getattr(ns, "speculative_config", None),
                      cpu_offload_gb=ns.cpu_offload_gb, max_resident_weights=ns.max_resident_weights)


def resolve_model_arg(ns: argparse.Namespace) -> None:
    """Merge the positional MODEL into ``ns.model``; raise ValueError when both are given and differ."""
    if ns.model_tag is not None:
        if ns.model is not None and ns.model != ns.model_tag:
            raise ValueError(f"two different models given: {ns.model_tag!r} and --model {ns.model!r}")
        ns.model = ns.model_tag


def engine_flags_given(ns: argparse.Namespace) -> list[str]:
    """The engine flags whose value differs from their default."""
    engine_parser = argparse.ArgumentParser(add_help=False)
    add_engine_args(engine_parser)
    given = []
    for action in engine_parser._actions:  # noqa: SLF001 - the parser's own flag table
        if action.dest == "ray_address" and getattr(ns, "ray", False):
            continue  # with --ray it is the Serve cluster's address, not an engine setting
        if action.option_strings and getattr(ns, action.dest, action.default) != action.default:
            given.append(max(action.option_strings, key=len))
    return given


def flags_conflicting_with_config(ns: argparse.Namespace) -> list[str]:
    """The model, engine and model repository flags given together with ``--config`` (they belong in the
    file)."""
    from flotilla.deploy.repository_args import repository_flags_given
    given = []
    if ns.model_tag is not None:
        given.append("MODEL")
    if ns.served_model_name is not None:
        given.append("--served-model-name")
    return given + engine_flags_given(ns) + repository_flags_given(ns)


def deployment_from_cli(ns) -> DeploymentConfig:
    """The deployment that ``flotilla serve [MODEL] [engine flags] [--model-repository ...]`` stands for: one
    model named ``--served-model-name`` (default: the model argument), one replica, ``engine`` holding the
    flags that differ from ``EngineArgs``' defaults; with ``--model-repository`` also that repository
    (``repository_args``), and then no LLM unless a MODEL is given. Raises ValueError when MODEL and
    ``--model`` disagree, for repository flags that break a rule, and for model or engine flags with only a
    repository (they would be ignored)."""
    from flotilla.deploy.repository_args import repository_spec_from
    from flotilla.engine.arg_utils import EngineArgs
    from flotilla.models.loader.resolve import DEFAULT_ALIAS
    resolve_model_arg(ns)
    repository = repository_spec_from(ns)
    if repository is not None and ns.model is None:
        stray = (["--served-model-name"] if getattr(ns, "served_model_name", None) else []) + engine_flags_given(ns)
        if stray:
            raise ValueError(f"{', '.join(stray)} {'needs' if len(stray) == 1 else 'need'} a MODEL to serve "
                             f"(with only --model-repository no LLM is loaded)")
        return DeploymentConfig(models=(), model_repository=repository, source="the command line")
    args, defaults = engine_args_from(ns), EngineArgs()
    engine = {k: v for k, v in vars(args).items()
              if k not in ENGINE_KEYS_SET_ELSEWHERE and v != getattr(defaults, k)}
    model = ns.model or DEFAULT_ALIAS
    name = getattr(ns, "served_model_name", None) or model
    return DeploymentConfig(models=(ModelSpec(name=name, model=model, tensor_parallel_size=args.tensor_parallel_size,
                                              pipeline_parallel_size=args.pipeline_parallel_size, engine=engine),),
                            model_repository=repository, source="the command line")
