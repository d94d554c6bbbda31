"""Recipes: one job kind each, read top to bottom, built from engine.training; never another recipe."""
