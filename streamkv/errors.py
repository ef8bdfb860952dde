class ConfigError(ValueError):
    """A user-facing config mistake; its message is one line: `field: what is allowed`."""
