"""Pallas kernels for the routed expert matmuls (grouped matmul). Empty until its own issue lands."""
