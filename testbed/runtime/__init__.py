"""Everything that touches the kernel: namespaces, links, processes, captures, probes."""
