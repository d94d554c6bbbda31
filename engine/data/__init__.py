"""Datasets from file to tokens: raw rows, one validated format per file, the loss mask."""
