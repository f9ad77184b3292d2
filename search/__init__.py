"""Transfer-learning hyperparameter search for CIFAR-10 on Keras Applications.

Stages (data flows one way; later modules import earlier ones, never the reverse)::

    data -> backbones -> cache -> heads/space -> train -> engines -> final -> report -> paper

Each module has one entry point: ``load_data``, ``get_backbone``, ``ensure_cache``,
``build_head``/``suggest``, ``train_head``/``train_tail``, ``make_engine``, ``build_final``,
``write_report``, ``write_paper``, ``run_classic``.
"""

import os

__all__ = ["__version__", "ALLOCATOR_ENV"]
__version__ = "0.1.0"

# TensorFlow's own BFC allocator for CPU tensors, set before TensorFlow loads (importing this
# package first is enough). With glibc's malloc every activation above 32 MB is a fresh mmap,
# zero-filled by the kernel: the frozen pass spent 30-40 % of its CPU time in the kernel here.
# `make bench-cache` measures both (results/bench_cache.json). Set the variable to "false"
# beforehand to opt out.
ALLOCATOR_ENV = "TF_CPU_ALLOCATOR_USE_BFC"
os.environ.setdefault(ALLOCATOR_ENV, "true")
