"""The ``fixclf`` command line: a thin typer layer over :mod:`compressor`."""
