"""Evaluation: distribution metrics (FID, KID, IS, precision/recall, domain FID), CLIP score, reference features,
the resumable sampling grid, cost accounting, and the shapes prompt-adherence evaluator."""
