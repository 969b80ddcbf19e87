"""Kernel-vs-reference checks: the kernel check set (checks.py) over hypothesis-drawn cases
(strategies.py), against slow references (reference.py) built on the routing oracle, for any
kernels declared as a ``KernelSubject`` (subjects.py); and a bridge that runs a subject's
experts inside a transformers model (hf_integration.py)."""
