"""Registry of weight tags and shipped weights (installed as hear_msm.weights)."""
