"""nodekit: job preparation and release tasks for Azure Batch compute nodes."""

__version__ = "0.1.0"
