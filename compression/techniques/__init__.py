"""One module per technique family; each registers itself in ``compression.registry``."""
