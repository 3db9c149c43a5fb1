"""Scaling science: pass@k estimators (passk), curve forms (curves), fitting with bootstrap CIs (fit, lsq)."""
