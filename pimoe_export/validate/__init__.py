"""Parity checks: PyTorch vs backends (Polygraphy), error statistics, routing agreement, reports."""
