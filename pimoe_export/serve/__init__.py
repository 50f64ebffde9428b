"""Serving units: a Triton Inference Server model repository for Triton's own backends (``triton``), and a real
tritonserver in front of units through our Engine (``server``)."""
