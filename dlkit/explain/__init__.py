"""dlkit explain: attributions for image and text models, with measured faithfulness.

``explain_artifact(path, ExplainOptions(...))`` returns an ``ExplainResult`` (``to_dict()`` for
JSON). Captum is imported only when attributions are computed (the ``explain`` extra).
"""

from dlkit.explain.core import ExplainOptions, ExplainResult, SampleExplanation, explain_artifact, parse_index, \
    parse_metrics

__all__ = ["ExplainOptions", "ExplainResult", "SampleExplanation", "explain_artifact", "parse_index", "parse_metrics"]
