"""ML backends: model adapters served through the one shared protocol module (``protocol.py``)."""
