"""Audit any causal LM: what it leaks (extraction, exposure, membership, one-run epsilon),
how well it does its task, and an HTML report comparing models."""

from dpft.audit.report import write_report
from dpft.audit.runner import run_audit
from dpft.audit.utility import evaluate_utility

__all__ = ["evaluate_utility", "run_audit", "write_report"]
