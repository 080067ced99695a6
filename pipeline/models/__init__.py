"""Token models over the unified vocabulary: decoder (CM3Leon-style), VALL-E, Parti."""
