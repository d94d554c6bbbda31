"""The ``backprop`` command line.

main      parsing and dispatch
show      what the CLI prints for people (tables, reports, summaries with next commands)
"""
