"""flotilla: distributed LLM inference and serving.

``from flotilla import LLM, SamplingParams`` is the offline API; ``AsyncLLM`` streams for servers.
Heavy modules load lazily so ``import flotilla`` stays cheap.
"""

from flotilla.outputs import CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput, Logprob, RequestOutput
from flotilla.pooling_params import PoolingParams
from flotilla.request import BATCH_PRIORITY
from flotilla.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "AsyncLLM", "EngineArgs", "SamplingParams", "PoolingParams", "RequestOutput", "CompletionOutput",
           "Logprob", "EmbeddingRequestOutput", "EmbeddingOutput", "BATCH_PRIORITY", "__version__"]


def __getattr__(name):
    if name == "LLM":
        from flotilla.engine.llm import LLM
        return LLM
    if name == "AsyncLLM":
        from flotilla.engine.async_llm import AsyncLLM
        return AsyncLLM
    if name == "EngineArgs":
        from flotilla.engine.arg_utils import EngineArgs
        return EngineArgs
    raise AttributeError(f"module 'flotilla' has no attribute {name!r}")
