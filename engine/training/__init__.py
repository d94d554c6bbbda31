"""Building blocks of a training recipe: engine.recipes calls these."""
