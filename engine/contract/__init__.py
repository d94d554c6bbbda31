"""The contract between the server, the front-ends and a job's worker (torch-free, the lowest layer).

spec     job specifications (every setting, declared once), JobResult, the job folder's file names
events   the typed events a worker appends to events.jsonl, their writer and resumable reader
files    atomic writes, the state folder, user paths
errors   the exceptions and records that several layers share (JobCancelled, DatasetError, ...)
"""
