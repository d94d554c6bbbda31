"""Jobs as processes: the job folder, the worker that runs a recipe in it, and its companions."""
