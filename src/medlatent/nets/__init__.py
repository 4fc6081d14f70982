"""Networks: encoders (backbones.py) and heads (heads.py)."""
