"""Compression: pruning and quantization, each returning a new artifact and a before/after report.

- ``prune``: ``PruneOptions``, ``PruneResult``, ``prune_artifact`` (the command's library call);
  ``structured`` (channels, attention heads, recurrent units, as each family declares in
  ``dlkit.models.Support``), ``unstructured`` (magnitude masks), ``search`` (the ratio for a
  target, the sensitivity analysis), ``rnn_prune`` (the hidden-unit pruner).
- ``quantize``: ``QuantizeOptions``, ``QuantizeResult``, ``quantize_artifact``, and the
  ``quantize`` transform's rebuilder; ``codec``: its weights codec (int8 and half-size tensors in
  safetensors).
- Before/after numbers come from ``dlkit.profiling.measure_models``, the one measurement.

This package imports none of its modules, so each is loaded where it is used. An artifact
holding a ``quantize`` transform loads with no special call: ``dlkit.artifacts`` imports
``dlkit.compress.quantize`` on first sight of the kind, and that module imports ``codec``, so the
rebuilder and the codec are registered together.
"""
