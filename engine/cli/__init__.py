"""The ``backprop`` command line: parsing and dispatch (main), what it prints for people (show)."""
