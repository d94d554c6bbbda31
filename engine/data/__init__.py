"""Datasets from file to tokens.

sources     raw rows of JSONL/JSON/CSV/Parquet/saved datasets/hub, with their positions
formats     one format per file, row validation (file:line problems), normalised examples, eval split
tokenizing  chat-template rendering and tokenisation with the loss mask (takes a tokenizer)
"""
