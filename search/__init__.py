"""Transfer-learning hyperparameter search for CIFAR-10 on Keras Applications.

Stages (data flows one way; later modules import earlier ones, never the reverse)::

    data -> backbones -> cache -> heads/space -> engines -> final -> report

Each module has one entry point: ``load_cifar10``, ``get_backbone``, ``ensure_cache``,
``build_head``/``suggest``, ``run_search``, ``build_final``, ``write_report``.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
