"""Exceptions that cross layers: raised deep in a recipe, turned into a job's outcome by the worker."""


class JobCancelled(Exception):
    """The user asked the job to stop (``cancel.request``); raised at a safe point (after a checkpoint)."""
