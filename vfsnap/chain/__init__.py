"""Backing chains of images, views resolved through them, and the operations that change them."""
