"""The one error type of the inference path (geometry, engines, ``Predictor``, ``ciae-predict``).

Its own module so that every layer of inference can raise it without importing the layers above
it; :mod:`ciae_core.predictor` re-exports it.
"""


class PredictorError(RuntimeError):
    """User-facing inference problem (one line: what is wrong and what to do)."""
