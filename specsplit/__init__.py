"""specsplit: lossless speculative decoding, in-process or split into gRPC tiers."""

from specsplit.config import SpeculativeConfig
from specsplit.outputs import CompletionOutput, RequestOutput, SpecMetrics
from specsplit.sampling.params import SamplingParams

__all__ = ["LLM", "Client", "SamplingParams", "SpeculativeConfig", "RequestOutput", "CompletionOutput", "SpecMetrics"]
__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: importing specsplit should not load torch-heavy modules
    if name == "LLM":
        from specsplit.llm import LLM

        return LLM
    if name == "Client":
        from specsplit.client import Client

        return Client
    raise AttributeError(name)
