"""Triton implementations of the kernel ops. Importing anything here imports triton: the public ops
in ``srp4ctr.kernels`` import these modules lazily, inside the call, and only on the Triton backend.
"""
