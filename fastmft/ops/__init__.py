"""The math, no I/O: per op the pure-PyTorch reference (reference.py), the autograd Functions over
fastmft.kernels (triton.py), the public functions (functional.py, prototypes.py, nn.py,
inner_step.py), argument checks (_checks.py) and the one dispatch module (dispatch.py)."""
