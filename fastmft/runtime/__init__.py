"""The runtime layer: device choice and the process group, backbone loading, crash-safe files,
and quieting third-party progress output."""
