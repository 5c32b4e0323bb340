"""Hugging Face / timm weights <-> mgjax params (see files.py for the file formats)."""
