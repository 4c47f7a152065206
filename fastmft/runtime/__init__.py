"""The runtime layer: device choice and the process group, backbone loading, crash-safe files,
quieting third-party progress output, and the one test seam (faults: where tests make a run fail)."""
