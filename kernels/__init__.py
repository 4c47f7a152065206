"""Triton kernels of fastmft (installed as fastmft.kernels): @triton.jit functions and thin launch
functions only; autograd and dispatch live in fastmft/. Importing this package does not import
Triton: each kernel module does, when fastmft's dispatch first needs it."""
