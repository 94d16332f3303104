"""Evaluation: the feature network, the metrics (FID, the digit histogram, precision and recall), the evaluation's machinery
and the figures."""

