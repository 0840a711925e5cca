"""The samplers that propose rate vectors, one a module."""
