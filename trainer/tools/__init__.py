"""Precision tools beside training: the dtype audit (``--audit``), the policy comparison
(``--compare_policies``) and the numerics inspector (``--numerics``).
"""
