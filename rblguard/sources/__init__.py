"""Sources: follow the SMTP logs across rotations and restarts, and hand on complete lines with
their stamps.
"""
