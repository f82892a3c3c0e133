"""Language models: tokenizers for text-lm data, generation with a key/value cache, perplexity.

- ``dlkit.lm.tokenizer``: char, byte-level BPE (``tokenizers``) and Hugging Face tokenizers, each
  saved as a JSON state in the artifact's data state and rebuilt from it.
- ``dlkit.lm.generate``: sampling (temperature, top-k, top-p, seed) through a model's
  ``decode(ids, cache)``; ``dlkit generate`` calls ``generate_artifact``.
- ``dlkit.lm.evaluate``: loss, perplexity and bits per character (or byte) over token windows.
- ``dlkit.lm.cost``: what ``dlkit profile`` adds for them: MACs per token, KV-cache bytes,
  prefill and decode latency.

A language model here is any module with ``forward(ids (N, L)) -> logits (N, L, V)`` and
``decode(ids (N, T), cache) -> (logits (N, T, V), cache)``: dlkit's gpt family and ``hf:`` causal
LMs alike. Importing this package imports no torch.
"""
