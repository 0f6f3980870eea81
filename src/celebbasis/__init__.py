"""celebbasis: put anyone into Stable Diffusion from one face photo.

Implements "Inserting Anybody in Diffusion Models via Celeb Basis" (Yuan et al., NeurIPS 2023).
"""

__version__ = "0.1.0"
