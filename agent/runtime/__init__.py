"""The agent runtime: `meshlet run` joins sources, resolve and the datapath in one sync loop.

Layering inside this package (low to high; a module never imports one above it):
settings, logs -> metrics, health, status_writer, leader -> store -> loop -> http -> cli.
Only cli.py wires concrete sources and the datapath together; the Kubernetes client is imported
by cli.py lazily, and only in Kubernetes mode.
"""
