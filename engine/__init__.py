"""litefocus.engine: the engine directory format and the backends that run one UNet call (issue 3/4)."""
