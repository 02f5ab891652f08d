"""Evaluation: the shapes prompt-adherence evaluator."""
