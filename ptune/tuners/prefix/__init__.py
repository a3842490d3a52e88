"""See config.py and model.py."""
