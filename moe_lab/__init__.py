"""moe_lab: measure how a Mixture-of-Experts layer moves tokens between ranks under expert parallelism."""

__version__ = "0.1.0"
