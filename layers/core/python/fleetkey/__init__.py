"""fleetkey core library: device identity lifecycle on AWS IoT."""

__version__ = "0.1.0"
