"""Datasets: report parsing, labels, the rendered phantom radiographs and splits."""
