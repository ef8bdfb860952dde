"""Backends run the decode step: eager for now (compile / cudagraph / fused: the fast-path issue)."""

BACKENDS = ("eager",)


def check_backend(cfg) -> None:
    from streamkv.errors import ConfigError

    if cfg.backend.name not in BACKENDS:
        raise ConfigError(f"backend: '{cfg.backend.name}' is not one of {', '.join(BACKENDS)}")
