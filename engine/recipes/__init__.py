"""Recipes: one job kind each, read top to bottom, built from engine.training's blocks.

A recipe never imports another recipe.
"""
