"""The contract between the server, the front-ends and a job's worker (torch-free, the lowest layer).

spec     job specifications (every setting, declared once), JobResult, the job folder's file names
settings the flat setting names the tools, CLI and API take, made from the spec's fields; training_spec
events   the typed events a worker appends to events.jsonl, their writer and resumable reader
files    atomic writes, the state folder, user paths
errors   the exceptions and records that several layers share (JobCancelled, DatasetError, ...)
"""
