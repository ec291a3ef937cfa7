"""Programs that run INSIDE the nodes (``python -m testbed.peers.<module>``): the python TLS
peer and its split-ClientHello client. Standard library only, and this package imports
nothing, so starting one costs an interpreter, not the orchestrator's imports (Mininet,
jinja2...): about 0.05 s instead of 0.3 s per peer.
"""
