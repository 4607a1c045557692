"""One module per ``rmt-kernels`` command (``cli.py`` only parses arguments and dispatches)."""
