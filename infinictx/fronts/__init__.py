"""Fronts: thin layers that turn a request into a `runs.RunSpec` and show the result. `cli.py` is the command
line; its flags are built from the settings of every registered method and task."""
