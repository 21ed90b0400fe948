"""litefocus.engine: the engine directory format (manifest read and checked, its typed view, the
contracts of every exported graph) and the torch-free backends that run one graph call."""
