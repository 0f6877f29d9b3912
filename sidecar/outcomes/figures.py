"""Short names of the quality figures guard rules can watch, and where each sits in a
``QualityReport`` (a dotted path; ``:p`` at the end means the figure's p-value).

A leaf module (no imports): ``sidecar.aggregate.guards`` validates rule figure names against
these as well as the aggregator's own, without importing the outcomes stage.
"""

from __future__ import annotations

#: Figure name -> dotted path in ``QualityReport`` (``:p``: the figure's p-value).
QUALITY_FIGURE_PATHS: dict[str, str] = {
    # candidate minus champion, with confidence intervals (lo/hi) and p-values
    "auc_diff": "diff.auc",
    "average_precision_diff": "diff.average_precision",
    "log_loss_diff": "diff.log_loss",
    "brier_diff": "diff.brier",
    "cost_diff": "diff.cost",
    "accuracy_diff": "diff.accuracy",
    "recall_diff": "diff.recall",
    "f1_diff": "diff.f1",
    "calibration_error_diff": "diff.calibration_error",
    "correctness_mcnemar_p_value": "diff.correctness_mcnemar:p",
    # each arm
    "candidate_auc": "candidate.auc",
    "champion_auc": "champion.auc",
    "candidate_average_precision": "candidate.average_precision",
    "champion_average_precision": "champion.average_precision",
    "candidate_cost": "candidate.mean_cost",
    "champion_cost": "champion.mean_cost",
    "candidate_log_loss": "candidate.log_loss",
    "champion_log_loss": "champion.log_loss",
    "candidate_recall": "candidate.recall",
    "champion_recall": "champion.recall",
    "candidate_precision": "candidate.precision",
    "champion_precision": "champion.precision",
    "candidate_calibration_error": "candidate.calibration_error",
    "champion_calibration_error": "champion.calibration_error",
    # ranking rollouts (``QualityReport.ranking``; insufficient data on binary ones):
    # candidate minus champion, then each arm
    "ndcg_diff": "ranking.ndcg_diff",
    "ctr_diff": "ranking.ctr_diff",
    "mrr_diff": "ranking.mrr_diff",
    "candidate_ndcg": "ranking.ndcg_candidate",
    "champion_ndcg": "ranking.ndcg_champion",
    "candidate_ctr": "ranking.ctr_candidate",
    "champion_ctr": "ranking.ctr_champion",
    "candidate_mrr": "ranking.mrr_candidate",
    "champion_mrr": "ranking.mrr_champion",
    # labels
    "label_coverage": "label_coverage",
}

__all__ = ["QUALITY_FIGURE_PATHS"]
