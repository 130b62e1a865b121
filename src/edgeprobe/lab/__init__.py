"""The WAN lab: a topology of sites, nodes and links built as network namespaces on this host.

* :mod:`~edgeprobe.lab.topology` — the topology file's model and its validation (pure);
* :mod:`~edgeprobe.lab.netns` — namespace plumbing (``ip``, setns, sysctls, clean-up);
* :mod:`~edgeprobe.lab.linkemu` — the userspace link emulator for kernels without netem;
* :mod:`~edgeprobe.lab.build` — ``lab up`` / ``down`` / ``ls`` / ``exec``.
"""
