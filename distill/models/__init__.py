"""Model families, student construction and layer-copy initialisation, layer maps."""
