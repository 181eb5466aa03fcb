"""Speculative decoding (vLLM's ``--speculative-config``): proposers (n-gram prompt lookup, a draft model)
and the verification that keeps the target model's distribution exactly (``rejection``)."""
