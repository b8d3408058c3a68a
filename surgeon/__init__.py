"""surgeon: an adaptive learning-rate controller for PyTorch Lightning."""
