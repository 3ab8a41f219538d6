"""fedkd: federated and privacy-preserving knowledge distillation on Flower."""

__version__ = "0.1.0"
