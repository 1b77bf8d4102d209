"""netcompress: neural network compression as a job queue."""
__version__ = "0.1.0"
