"""Load and keep-warm tools for the service and its RunPod endpoint."""
