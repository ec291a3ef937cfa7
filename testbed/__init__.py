"""MPTCP security testbed: TLS over Multipath TCP versus TLS over TCP, measured.

Layout: ``testbed.model`` is pure data and logic (specs, playbooks, results, verdicts);
``testbed.runtime`` touches the kernel (namespaces, links, processes, captures);
``testbed.apps`` are the real TLS peers; ``testbed.cli`` is the command line.
"""

__version__ = "0.1.0"
