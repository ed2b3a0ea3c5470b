"""Example backends, health checks and embedding code for stickylb."""
