"""mvpp: micro-video popularity prediction models built on mvpp_kernels' public ops."""
__version__ = "0.1.0"
