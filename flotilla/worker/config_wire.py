"""EngineConfig <-> a JSON-able dict, to start worker processes without pickle.

The Hugging Face config is not shipped: a worker re-reads it from the same model source.
"""

from __future__ import annotations

import dataclasses

from flotilla.config import (CacheConfig, DeviceConfig, EngineConfig, ModelConfig, ParallelConfig,
                             SchedulerConfig)


def engine_config_to_wire(config: EngineConfig) -> dict:
    model = {f.name: getattr(config.model, f.name) for f in dataclasses.fields(ModelConfig)
             if f.name != "hf_config"}
    return {"model": model, "cache": dataclasses.asdict(config.cache),
            "scheduler": dataclasses.asdict(config.scheduler), "parallel": dataclasses.asdict(config.parallel),
            "device": dataclasses.asdict(config.device)}


def engine_config_from_wire(d: dict) -> EngineConfig:
    from flotilla.models.loader import ResolvedModel, load_hf_config
    m = dict(d["model"])
    hf_config = load_hf_config(ResolvedModel(source=m["source"], kind=m["source_kind"]))
    parallel = dict(d["parallel"])
    if "pipeline_partition" in parallel and parallel["pipeline_partition"] is not None:
        parallel["pipeline_partition"] = tuple(parallel["pipeline_partition"])
    return EngineConfig(model=ModelConfig(hf_config=hf_config, **m), cache=CacheConfig(**d["cache"]),
                        scheduler=SchedulerConfig(**d["scheduler"]), parallel=ParallelConfig(**parallel),
                        device=DeviceConfig(**d["device"]))
