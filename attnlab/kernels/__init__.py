"""Triton GPU kernels, used only through the ``attnlab.ops`` dispatch (``mode="triton"``/``"auto"``).

Importing this package does not import triton; :mod:`attnlab.kernels.linear` does.
"""
