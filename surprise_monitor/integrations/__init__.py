"""Integrations with serving engines (each an optional extra): :mod:`.ray_serve` runs the
monitored model on Ray Serve (``pip install surprise-monitor[ray]``)."""
