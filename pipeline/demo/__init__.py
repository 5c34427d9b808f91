"""The built-in demo: cluttered digit canvases and a small trained embedding model."""
